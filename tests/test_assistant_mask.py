"""Assistant-only loss masks on the chat templates real checkpoints ship, checked token by token."""

from __future__ import annotations

from importlib.resources import files

import pytest
from transformers import AutoTokenizer

from rlhf.config import RecipeError
from rlhf.data.assistant_mask import check_maskable, tokenize_conversation

TRL_TEMPLATES = files("trl") / "chat_templates"
# Mistral-7B-Instruct-v0.1's tokenizer_config.json template (TRL ships none for Mistral).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# name -> (template source, bos, eos/end-of-turn token, extra special tokens)
TEMPLATES = {
    "chatml (Qwen2.5)": ("qwen2_5.jinja", "<|endoftext|>", "<|im_end|>", ["<|im_start|>"]),
    "llama-3": ("llama3.jinja", "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "gemma": ("gemma.jinja", "<bos>", "<end_of_turn>", ["<start_of_turn>", "<eos>"]),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", []),
}
# The second user turn quotes the first answer: masking must not take the quote for the answer.
CONVERSATION = [
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "It is blue."},
    {"role": "user", "content": 'You said "It is blue." Why?'},
    {"role": "assistant", "content": "Air scatters blue light most."},
]


def trained_runs(row: dict, tokenizer) -> list[str]:
    """The decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, trained in zip(row["input_ids"], row["assistant_masks"]):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.fixture(scope="module")
def template_tokenizers(tiny_checkpoint):
    """The tiny byte-level BPE tokenizer, given each family's special tokens and template."""
    made = {}
    for name, (template, bos, eos, extra) in TEMPLATES.items():
        tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
        tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": extra})
        tokenizer.chat_template = (TRL_TEMPLATES / template).read_text() if template.endswith(".jinja") else template
        made[name] = tokenizer
    return made


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_mask_covers_exactly_each_reply_and_its_end_of_turn_token(template_tokenizers, name):
    tokenizer = template_tokenizers[name]
    eos = TEMPLATES[name][2]
    row = tokenize_conversation(tokenizer, CONVERSATION)
    assert row["input_ids"] == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert trained_runs(row, tokenizer) == ["It is blue." + eos, "Air scatters blue light most." + eos]


@pytest.mark.parametrize("name", ["chatml (Qwen2.5)", "llama-3", "gemma"])
def test_the_mask_agrees_with_trls_generation_markers_token_by_token(template_tokenizers, name):
    # TRL ships these families' templates with {% generation %} markers added. The same tokens train, except
    # that TRL's Qwen2.5 and Gemma markers also take the newlines around a reply, which are not the reply.
    tokenizer = template_tokenizers[name]
    training_template = (TRL_TEMPLATES / TEMPLATES[name][0].replace(".jinja", "_training.jinja")).read_text()
    marked = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=training_template, return_dict=True, return_assistant_tokens_mask=True
    )
    ours = tokenize_conversation(tokenizer, CONVERSATION)
    assert ours["input_ids"] == marked["input_ids"]
    differing = [i for i, (a, b) in enumerate(zip(ours["assistant_masks"], marked["assistant_masks"])) if a != b]
    assert all(marked["assistant_masks"][i] == 1 for i in differing)
    assert all(tokenizer.decode(ours["input_ids"][i]).strip() == "" for i in differing)
    assert len(differing) == {"chatml (Qwen2.5)": 4, "llama-3": 0, "gemma": 2}[name]


def test_smollm2s_own_template_with_its_default_system_line(smollm2_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    row = tokenize_conversation(tokenizer, CONVERSATION)
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert trained_runs(row, tokenizer) == ["It is blue.<|im_end|>", "Air scatters blue light most.<|im_end|>"]
    check_maskable(tokenizer)


def test_a_template_that_rewrites_content_is_refused_with_the_fix(template_tokenizers):
    tokenizer = template_tokenizers["llama-3"]
    shouting = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] | upper }}<|eot_id|>{% endfor %}"
    with pytest.raises(
        RecipeError, match=r"^assistant_only_loss: the chat template message 0 \(user\) is not rendered"
    ):
        check_maskable(tokenizer, shouting)
