"""The embedded tiny world's base checkpoint: a small Llama-style model and a BPE tokenizer trained locally.

rlhf tiny-checkpoint outputs/tiny/base
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch, tokenizers and transformers load when a checkpoint is built, not for --help
    from transformers import PreTrainedTokenizerFast

# The tiny world's template: ChatML with the assistant turn (and its closing token, the EOS) wrapped
# in generation markers, so SFT's assistant_only_loss trains the model to emit the stop token.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
EXTRA_SPECIAL_TOKENS = ["<|im_start|>"]


def train_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the embedded world's corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf.data.synthetic import corpus_for_tokenizer

    special = [*SPECIAL_TOKENS.values(), *EXTRA_SPECIAL_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar is blank lines on stdout when not a terminal; it trains in about a second
    )
    backend.train_from_iterator(list(corpus_for_tokenizer()) * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_checkpoint(
    output: str | Path,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    vocab_size: int = 1024,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny Llama-style checkpoint with a locally trained tokenizer.

    A Llama config keeps our tokenizer as is (a Qwen2 config would make AutoTokenizer swap in
    Qwen2Tokenizer and change token ids).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.artifacts import atomic_output_dir, check_output_dir
    from rlhf.modeling import align_generation_config

    check_output_dir(output, "OUTPUT_DIR", writer="tiny-checkpoint")
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    align_generation_config(model, tokenizer)
    with atomic_output_dir(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)


def main(argv: list[str] | None = None) -> None:
    """`rlhf tiny-checkpoint OUTPUT_DIR`: write the embedded default's base checkpoint."""
    parser = argparse.ArgumentParser(prog="rlhf tiny-checkpoint", description=build_tiny_checkpoint.__doc__)
    parser.add_argument("output")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    print(f"wrote tiny checkpoint to {build_tiny_checkpoint(**vars(parser.parse_args(argv)))}")


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
