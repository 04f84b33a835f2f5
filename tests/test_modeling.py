"""The tiny checkpoint loads back by path like a user's, ready for chat training; untrusted ones are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf.checkpoint_files import pickle_weight_files
from rlhf.config import ModelArguments, RecipeError
from rlhf.dropout import disable_dropout
from rlhf.modeling import (
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
)
from rlhf.stages import sft
from tests.conftest import write_recipe


def test_tiny_checkpoint_round_trip(tiny_checkpoint):
    model_args = ModelArguments(model_name_or_path=str(tiny_checkpoint))
    tokenizer = load_tokenizer(model_args)
    model = load_causal_lm(model_args)
    assert (tiny_checkpoint / "model.safetensors").exists()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # the tokenizer is used as trained (a Qwen2 config would swap in another class and other ids)
    assert tokenizer.tokenize("The zorp is red.") == ["The", "Ġzorp", "Ġis", "Ġred", "."]


def test_chat_template_marks_assistant_turn_including_eos(tiny_checkpoint):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_checkpoint)))
    messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]
    encoded = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    masked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "Hi.<|im_end|>"
    assert masked[-1] == tokenizer.eos_token_id


def _gpt2(dropout: float) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(config, name, dropout)
    return GPT2LMHeadModel(config)


def test_dropout_setting_reaches_the_model(tiny_checkpoint, tmp_path):
    model = load_causal_lm(ModelArguments(model_name_or_path=str(tiny_checkpoint), dropout=0.25))
    assert model.config.attention_dropout == 0.25
    _gpt2(0.1).save_pretrained(tmp_path / "gpt2")  # GPT-2 names its dropouts *_pdrop
    config = load_causal_lm(ModelArguments(model_name_or_path=str(tmp_path / "gpt2"), dropout=0.25)).config
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.25


def test_disable_dropout_turns_off_attention_dropout_too():
    # Llama's attention applies the float `attention_dropout` while training (no nn.Dropout to find);
    # GPT-2's dropouts are nn.Dropout modules. Disabled, a training-mode forward equals the eval-mode one.
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            attention_dropout=0.5,
        )
    )
    ids = torch.randint(0, 64, (2, 12))
    for model in (llama, _gpt2(0.5)):
        model.train()
        noisy = model(input_ids=ids).logits
        disable_dropout(model)
        trained = model(input_ids=ids).logits
        assert not torch.allclose(noisy, trained)
        torch.testing.assert_close(trained, model.eval()(input_ids=ids).logits)
    assert llama.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in llama.model.layers)


def test_score_head_model_from_causal_checkpoint(tiny_checkpoint):
    model_args = ModelArguments(model_name_or_path=str(tiny_checkpoint))
    tokenizer = load_tokenizer(model_args)
    classifier = load_sequence_classifier(model_args, tokenizer)
    out = classifier(**tokenizer(["The zorp is red."], return_tensors="pt"))
    assert out.logits.shape == (1, 1)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    torch.testing.assert_close(classifier.model.embed_tokens.weight, base.model.embed_tokens.weight)


def _pickled_copy(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint with its weights as a pickle (pytorch_model.bin), as older or untrusted uploads come."""
    shutil.copytree(checkpoint, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_before_loading_unless_the_recipe_allows_them(tiny_checkpoint, tmp_path):
    pickled = _pickled_copy(tiny_checkpoint, tmp_path / "pickled")
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(pickled),
        dataset_name="synthetic:sft",
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(RecipeError) as error:
        sft.parse([str(recipe)])
    message = str(error.value)
    assert message.startswith(f"model_name_or_path: {pickled}/pytorch_model.bin holds pickled weights")
    assert "Convert the checkpoint to safetensors" in message and "`allow_pickle_weights: true`" in message
    assert len(message.splitlines()) == 1
    # Commands load through the same functions, without a recipe in front of them.
    model_args = ModelArguments(model_name_or_path=str(pickled))
    with pytest.raises(RecipeError, match="pytorch_model.bin holds pickled weights"):
        load_causal_lm(model_args)
    with pytest.raises(RecipeError, match="pytorch_model.bin holds pickled weights"):
        load_sequence_classifier(model_args, load_tokenizer(model_args))

    allowed = sft.parse([str(recipe), "--allow_pickle_weights", "true"])
    model = load_causal_lm(allowed.model)
    expected = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    torch.testing.assert_close(model.model.embed_tokens.weight, expected.model.embed_tokens.weight)


@pytest.mark.parametrize(
    ("names", "pickles"),
    [
        (
            ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"],
            ["pytorch_model-00001-of-00002.bin"],
        ),
        (["config.json", "consolidated.00.pth", "model.pt"], ["consolidated.00.pth", "model.pt"]),
        (["config.json", "model.safetensors", "pytorch_model.bin"], []),  # use_safetensors=True: never read
        (["config.json", "model.safetensors", "training_args.bin", "optimizer.pt", "rng_state_0.pth"], []),
    ],
)
def test_pickle_weight_files_are_weights_without_safetensors(names, pickles):
    assert pickle_weight_files(names) == pickles


def test_trust_remote_code_names_the_checkpoint_whose_code_runs(tiny_checkpoint, capsys):
    model_args = ModelArguments(model_name_or_path=str(tiny_checkpoint))
    load_tokenizer(model_args)
    load_causal_lm(model_args)
    assert "trust_remote_code" not in capsys.readouterr().err
    load_tokenizer(model_args, trust_remote_code=True)
    load_causal_lm(model_args, trust_remote_code=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "trust_remote_code" in line]
    assert warnings == [f"warning: trust_remote_code: runs code from {tiny_checkpoint}"] * 2
