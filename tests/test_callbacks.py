"""L1 regularisation adds coef·sign(w) to the gradients of trainable weight matrices."""

from __future__ import annotations

import torch

from rlhf.callbacks import L1RegularizationCallback, regularization_callbacks
from rlhf.config import ModelArguments


def test_l1_adds_sign_of_weights_to_gradients_of_trainable_matrices():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)
    model(torch.randn(5, 4)).sum().backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    L1RegularizationCallback(0.5).on_pre_optimizer_step(None, None, None, model=model)
    weight = model[0].weight
    torch.testing.assert_close(weight.grad, before["0.weight"] + 0.5 * torch.sign(weight))
    torch.testing.assert_close(model[0].bias.grad, before["0.bias"])  # biases are not penalised
    assert model[1].weight.grad is None  # frozen weights untouched


def test_recipe_key_turns_the_callback_on():
    assert regularization_callbacks(ModelArguments(model_name_or_path="x")) == []
    (callback,) = regularization_callbacks(ModelArguments(model_name_or_path="x", l1_regularization=1e-4))
    assert callback.coef == 1e-4
