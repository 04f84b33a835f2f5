"""L1 regularisation adds coef·sign(w) to the gradients of trainable weight matrices; `disable_dropout` turns off
attention dropout too."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, GRPOConfig

from rlhf.callbacks import DisableDropoutCallback, L1RegularizationCallback, regularization_callbacks
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


def test_disable_dropout_also_turns_off_the_attention_dropout_trl_leaves_on(tmp_path):
    model_args = ModelArguments(model_name_or_path="x")
    cpu = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "activation_checkpointing": False}
    (callback,) = regularization_callbacks(model_args, DPOConfig(**cpu))  # TRL's default for DPO: no dropout
    assert isinstance(callback, DisableDropoutCallback)
    assert regularization_callbacks(model_args, GRPOConfig(**cpu)) == []  # GRPO's default keeps dropout
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    config.attention_dropout = 0.1  # what an SFT recipe's `dropout: 0.1` leaves in the checkpoint
    model = LlamaForCausalLM(config)
    callback.on_train_begin(None, None, None, model=model)
    assert model.config.attention_dropout == model.model.layers[0].self_attn.attention_dropout == 0.0
