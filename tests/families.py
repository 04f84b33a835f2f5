"""Tiny random checkpoints of real architectures, each with its family's own tokenizer class and chat conventions.

A checkpoint a user brings is not the embedded Llama: GPT-2's Conv1D blocks and its lone
`<|endoftext|>`, OPT's `</s>`, a GPT-NeoX tokenizer with no EOS at all, Qwen2's ChatML with pad ≠ EOS,
Llama 3's `<|eot_id|>` turn end beside `<|end_of_text|>`, Mistral's `[INST]` turns closed by `</s>`,
Gemma's `<end_of_turn>` that is not its EOS. Each builder here writes such a checkpoint: random
weights (hidden 32, 2 layers), a byte-level BPE vocabulary trained with `tokenizers` on the synthetic
world's corpus, loaded into the family's tokenizer class, saved beside the weights, and checked to
give the same ids after `AutoTokenizer.from_pretrained` (a family's class rebuilds its pipeline from
vocab + merges, so a mismatch would silently renumber tokens).

`family_*` session fixtures (parametrized by family) build each checkpoint once and share one SFT,
one SFT-LoRA and one reward output per family across the matrix in tests/test_families.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    GemmaTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

from rlhf.data.synthetic import corpus_for_tokenizer, make_synthetic_dataset

HIDDEN = 32
LAYERS = 2
HEADS = 2
POSITIONS = 256
VOCAB = 1024  # the corpus yields ~670 byte-level tokens; the trainer stops there

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"

# Mistral-7B-Instruct's convention: [INST] user [/INST] answer</s>; a system message is folded into the first user turn.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' %}"
    "{%- for message in messages if message['role'] != 'system' %}"
    "{%- if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    """What a family's checkpoint looks like to the toolkit: its tokens, template and generation config."""

    name: str
    build: Callable[[Path], None]
    architecture: str
    end_of_turn: str | None  # the token closing an assistant turn (None: whatever rlhf's default template picks)
    generation_eos: tuple[str, ...]  # generation_config.eos_token_id, as tokens
    pad: str | None
    has_template: bool
    lora_targets: tuple[str, ...]
    # quantize backend → the documented one-line refusal (a regex), for backends that cannot quantize the family
    quantize_refusals: dict[str, str] = field(default_factory=dict)


# ---- tokenizers --------------------------------------------------------------------------------


def _corpus() -> list[str]:
    return list(corpus_for_tokenizer()) * 2


def byte_level_vocab(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of a byte-level BPE trained on the synthetic corpus, the special tokens first (ids 0…)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def metaspace_vocab(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges for Gemma's pipeline (spaces become ▁, byte fallback <0x..>), specials first."""
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB + 256, special_tokens=specials + byte_tokens)
    backend.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def llama3_style_tokenizer(specials: list[str], **tokens: str) -> PreTrainedTokenizerFast:
    """A tiktoken-style byte-level BPE served by the generic fast class, as Llama 3 and Mistral ship theirs."""
    vocab, merges = byte_level_vocab(specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bos = tokens["bos_token"]
    # Both families prepend BOS when tokenizing text (their chat templates write it themselves).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in tokens.values()]})
    return tokenizer


def check_round_trip(tokenizer: PreTrainedTokenizerBase, folder: Path) -> PreTrainedTokenizerBase:
    """Reload the saved tokenizer as every command will (AutoTokenizer by path) and require the same ids."""
    reloaded = AutoTokenizer.from_pretrained(folder)
    samples = [*list(corpus_for_tokenizer())[:20], "Hello! <unusual> ünïcode 123", " leading space"]
    for text in samples:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], (folder.name, text)
        assert reloaded.decode(reloaded(text, add_special_tokens=False)["input_ids"]) == text, (folder.name, text)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(reloaded, name) == getattr(tokenizer, name), (folder.name, name)
    assert reloaded.chat_template == tokenizer.chat_template
    assert type(reloaded).__name__ == type(tokenizer).__name__, (type(reloaded), type(tokenizer))
    return reloaded


def _ids(tokenizer: PreTrainedTokenizerBase, *tokens: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    assert tokenizer.unk_token_id not in ids or "<unk>" in tokens, tokens
    return ids


def _save(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eos: list[int] | None) -> None:
    """Save weights, tokenizer and a generation config that stops on `eos` (a list, as instruct models ship it)."""
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=eos if eos is None or len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    check_round_trip(tokenizer, folder)


def _seed() -> None:
    torch.manual_seed(0)


# ---- the families ----------------------------------------------------------------------------


def build_gpt2(folder: Path) -> None:
    """GPT-2: Conv1D blocks, tied head, `<|endoftext|>` is BOS/EOS/UNK, no pad, no chat template."""
    vocab, merges = byte_level_vocab(["<|endoftext|>"])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    _seed()
    config = GPT2Config(
        vocab_size=len(vocab), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
        bos_token_id=eot, eos_token_id=eot,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    _save(folder, model, tokenizer, [eot])


def build_opt(folder: Path) -> None:
    """OPT: `</s>` is BOS and EOS (prepended to every text), `<pad>`, `<unk>`; no chat template."""
    vocab, merges = byte_level_vocab(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer = GPT2Tokenizer(
        vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True,
    )  # fmt: skip
    _seed()
    config = OPTConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        ffn_dim=HIDDEN * 2, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    _save(folder, OPTForCausalLM(config), tokenizer, [tokenizer.eos_token_id])


def build_neox(folder: Path) -> None:
    """GPT-NeoX (Pythia): untied `embed_out` head, a tokenizer with no EOS (its vocab has `<|endoftext|>` = id 0)."""
    vocab, merges = byte_level_vocab(["<|endoftext|>", "<|padding|>"])
    tokenizer = GPTNeoXTokenizer(
        vocab=vocab, merges=merges, bos_token=None, eos_token=None, unk_token=None, pad_token="<|padding|>"
    )
    # As in Pythia's tokenizer.json: an added special token, never split into bytes, but not named the EOS.
    tokenizer.add_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)], special_tokens=True)
    _seed()
    config = GPTNeoXConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=HIDDEN * 4, max_position_embeddings=POSITIONS, rotary_pct=0.25,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    model = GPTNeoXForCausalLM(config)
    _save(folder, model, tokenizer, [0])  # Pythia's generation config: eos_token_id 0


def build_qwen2(folder: Path) -> None:
    """Qwen2.5-Instruct: ChatML, EOS `<|im_end|>`, pad `<|endoftext|>` (≠ EOS), generation stops on both."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, merges = byte_level_vocab(specials)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = (TRL_TEMPLATES / "qwen2_5.jinja").read_text()
    _seed()
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=HIDDEN * 2, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=POSITIONS,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    _save(folder, Qwen2ForCausalLM(config), tokenizer, _ids(tokenizer, "<|im_end|>", "<|endoftext|>"))


def build_llama3(folder: Path) -> None:
    """Llama 3.x Instruct: tied embeddings, BOS `<|begin_of_text|>`, EOS `<|eot_id|>`, no pad token."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = llama3_style_tokenizer(specials, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tokenizer.chat_template = (TRL_TEMPLATES / "llama3.jinja").read_text()
    _seed()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=HIDDEN * 2, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=POSITIONS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=_ids(tokenizer, "<|end_of_text|>", "<|eot_id|>"),
        tie_word_embeddings=True,
    )  # fmt: skip
    _save(folder, LlamaForCausalLM(config), tokenizer, _ids(tokenizer, "<|end_of_text|>", "<|eot_id|>"))


def build_mistral(folder: Path) -> None:
    """Mistral Instruct: `[INST] … [/INST] answer</s>`, BOS `<s>`, UNK `<unk>`, no pad token."""
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    tokenizer = llama3_style_tokenizer(specials, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = MISTRAL_TEMPLATE
    _seed()
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=HIDDEN * 2, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=POSITIONS, sliding_window=None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    _save(folder, MistralForCausalLM(config), tokenizer, [tokenizer.eos_token_id])


def build_gemma(folder: Path) -> None:
    """Gemma-it: `<start_of_turn>`/`<end_of_turn>` turns (the turn end is not the EOS `<eos>`), `<pad>`, tied head."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    vocab, merges = metaspace_vocab(specials)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = (TRL_TEMPLATES / "gemma.jinja").read_text()
    _seed()
    config = GemmaConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=HIDDEN * 2, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HIDDEN // HEADS,
        max_position_embeddings=POSITIONS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    _save(folder, GemmaForCausalLM(config), tokenizer, _ids(tokenizer, "<eos>", "<end_of_turn>"))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gpt2", build_gpt2, "GPT2LMHeadModel", None, ("<|endoftext|>",), None, False, ("c_attn", "c_proj"),
               dict.fromkeys(("quanto", "torchao"), r"^--backend \w+: GPT2LMHeadModel's blocks are transformers "
                             r"Conv1D layers .*use --backend bitsandbytes --method int8")),
        Family("opt", build_opt, "OPTForCausalLM", None, ("</s>",), "<pad>", False, ("q_proj", "v_proj")),
        Family("neox", build_neox, "GPTNeoXForCausalLM", None, ("<|endoftext|>",), "<|padding|>", False,
               ("query_key_value", "dense")),
        Family("qwen2", build_qwen2, "Qwen2ForCausalLM", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"),
               "<|endoftext|>", True, ("q_proj", "v_proj")),
        Family("llama3", build_llama3, "LlamaForCausalLM", "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>"), None,
               True, ("q_proj", "v_proj")),
        Family("mistral", build_mistral, "MistralForCausalLM", "</s>", ("</s>",), None, True, ("q_proj", "v_proj")),
        Family("gemma", build_gemma, "GemmaForCausalLM", "<end_of_turn>", ("<eos>", "<end_of_turn>"), "<pad>", True,
               ("q_proj", "v_proj")),
    )
}  # fmt: skip


def build_family_checkpoint(name: str, folder: Path) -> Path:
    """Write family `name`'s tiny random checkpoint (weights, tokenizer, generation config) to `folder`."""
    FAMILIES[name].build(folder)
    return folder


# ---- shared data and recipe settings ---------------------------------------------------------

FAST = {
    "report_to": "none",
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_steps": 1,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "seed": 0,
    "disable_tqdm": True,
    "max_steps": 1,
    "learning_rate": 1e-3,
    "clean_deduplicate": False,
    "synthetic_num_examples": 16,
    "max_eval_samples": 4,
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def family_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small local jsonl datasets shared by every family: preference train/test pairs and prompts."""
    root = tmp_path_factory.mktemp("family_data")
    return {
        "preference_train": write_jsonl(
            root / "pref_train.jsonl", make_synthetic_dataset("preference", 16, seed=0).to_list()
        ),
        "preference_test": write_jsonl(
            root / "pref_test.jsonl", make_synthetic_dataset("preference", 8, seed=0, split="test").to_list()
        ),
        "prompts": write_jsonl(root / "prompts.jsonl", make_synthetic_dataset("prompts", 16, seed=0).to_list()),
    }


# ---- session fixtures, one set per family ----------------------------------------------------


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    """Each family in turn; every fixture below is built once per family and shared by its cells."""
    return FAMILIES[request.param]


@pytest.fixture(scope="session")
def family_checkpoint(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint(family.name, tmp_path_factory.mktemp(family.name) / "base")


def run_stage(stage: str, folder: Path, name: str, **keys) -> Path:
    """Run a stage in-process from a recipe written to `folder`; return its output directory."""
    import importlib

    import yaml

    out = folder / name
    recipe = folder / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({"stage": stage, "output_dir": str(out), **keys}, sort_keys=False))
    importlib.import_module(f"rlhf.stages.{stage}").main([str(recipe)])
    return out


@pytest.fixture(scope="session")
def family_sft(family: Family, family_checkpoint: Path) -> Path:
    """One full SFT output per family (2 steps on synthetic conversations)."""
    return run_stage(
        "sft", family_checkpoint.parent, "sft", model_name_or_path=str(family_checkpoint),
        dataset_name="synthetic:sft", max_length=64, **{**FAST, "max_steps": 2},
    )  # fmt: skip


@pytest.fixture(scope="session")
def family_sft_lora(family: Family, family_checkpoint: Path) -> Path:
    """One LoRA SFT output per family (the stage merges the adapters into the base on save)."""
    return run_stage(
        "sft", family_checkpoint.parent, "sft_lora", model_name_or_path=str(family_checkpoint),
        dataset_name="synthetic:sft", max_length=64, use_peft=True, lora_r=4, lora_alpha=8,
        lora_target_modules=list(family.lora_targets), **FAST,
    )  # fmt: skip


@pytest.fixture(scope="session")
def family_reward(family: Family, family_sft: Path, family_data: dict[str, Path]) -> Path:
    """One reward model per family, trained from its SFT output (accuracy recorded; tiny, so ungated downstream)."""
    return run_stage(
        "reward", family_sft.parent, "reward", model_name_or_path=str(family_sft),
        dataset_name=str(family_data["preference_train"]), eval_dataset_name=str(family_data["preference_test"]),
        max_length=POSITIONS, reward_stats_samples=16, **FAST,  # every pair fits: TRL drops longer ones
    )  # fmt: skip


@pytest.fixture(scope="session")
def family_adapter(family: Family, family_checkpoint: Path) -> Path:
    """An adapter-only LoRA folder, as PEFT scripts and the Hub ship them (no tokenizer): what `rlhf merge` takes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(family_checkpoint)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(family.lora_targets), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    ids = AutoTokenizer.from_pretrained(family_checkpoint)("A glim is blue.", return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(2):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = family_checkpoint.parent / "adapter"
    peft_model.save_pretrained(out)
    return out
