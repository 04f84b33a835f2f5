"""The tiny checkpoint loads back by path like a user's, ready for chat training."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from rlhf.config import ModelArguments
from rlhf.modeling import load_causal_lm, load_sequence_classifier, load_tokenizer


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


def test_dropout_setting_reaches_the_model(tiny_checkpoint):
    model = load_causal_lm(ModelArguments(model_name_or_path=str(tiny_checkpoint), dropout=0.25))
    assert model.config.attention_dropout == 0.25


def test_score_head_model_from_causal_checkpoint(tiny_checkpoint):
    model_args = ModelArguments(model_name_or_path=str(tiny_checkpoint))
    tokenizer = load_tokenizer(model_args)
    classifier = load_sequence_classifier(model_args, tokenizer)
    out = classifier(**tokenizer(["The zorp is red."], return_tensors="pt"))
    assert out.logits.shape == (1, 1)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    torch.testing.assert_close(classifier.model.embed_tokens.weight, base.model.embed_tokens.weight)
