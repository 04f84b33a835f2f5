"""Making a checkpoint small: quantization (quantize.py), pruning (prune.py); distillation is a stage.

This module holds what every compression command measures and writes into `compress_report.json`:
size on disk, parameter count, sparsity, held-out rule score, perplexity and CPU latency.
torch, transformers and the data load inside the functions, so `rlhf quantize --help` is instant.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REPORT_FILE = "compress_report.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weights_size_bytes(path: str | Path) -> int:
    """Bytes of weight files in a checkpoint directory (config, tokenizer and reports excluded)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of a model, tied weights counted once (quantized weights count their logical elements)."""
    return sum(p.numel() for p in model.parameters())


def linear_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The nn.Linear layers inside the transformer blocks: what pruning and quantization act on.

    The token embedding (tied to the LM head in small models) is left out: pruning or quantizing
    it hurts every token, and a tied pair cannot be changed on one side only.
    """
    import torch

    output = model.get_output_embeddings()
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    ]


def _zeros(tensor: torch.Tensor) -> int:
    # Quantized weights (quanto, torchao) are tensor subclasses without `==`; their dense view has it.
    return int((tensor.detach().dequantize() == 0).sum())


def sparsity(model: torch.nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in the block linear weights and in all parameters."""
    linear_zeros = linear_total = 0
    for _, module in linear_weights(model):
        linear_zeros += _zeros(module.weight)
        linear_total += module.weight.numel()
    all_zeros = sum(_zeros(p) for p in model.parameters())
    return {
        "linear_sparsity": linear_zeros / max(linear_total, 1),
        "overall_sparsity": all_zeros / max(parameter_count(model), 1),
    }


def held_out_prompts(num_rows: int = 1000, seed: int = 0) -> list[list[dict[str, str]]]:
    """Every distinct held-out prompt of the embedded world (never seen in training), in a fixed order."""
    from rlhf.data.synthetic import make_synthetic_dataset

    unique: dict[str, list[dict[str, str]]] = {}
    for row in make_synthetic_dataset("prompts", num_rows, seed=seed, split="test"):
        unique.setdefault(row["prompt"][-1]["content"], row["prompt"])
    return [unique[key] for key in sorted(unique)]


def held_out_rule_score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 32) -> float:
    """Mean rule score of greedy answers to the held-out prompts (the embedded task's quality metric)."""
    from rlhf.data.synthetic import rule_reward
    from rlhf.evaluation.generation import generate_responses

    prompts = held_out_prompts()
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    scores = rule_reward(prompts, responses)
    return sum(scores) / len(scores)


def pretrain_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_texts: int = 200) -> float:
    """Perplexity on held-out `synthetic:pretrain` texts (facts about the world's creatures)."""
    from rlhf.data.synthetic import make_synthetic_dataset
    from rlhf.evaluation.perplexity import perplexity

    texts = make_synthetic_dataset("pretrain", num_texts, seed=1, split="test")["text"]
    return perplexity(model, tokenizer, texts)["perplexity"]


def latency_ms_per_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, new_tokens: int = 16, repeats: int = 2
) -> float:
    """CPU wall-clock milliseconds per generated token, batch 1, greedy, after one warm-up run."""
    import torch

    model.eval()
    prompt = tokenizer.apply_chat_template(held_out_prompts()[0], tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,  # a fixed token count, whatever the model would say
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.no_grad():
        model.generate(**encoded, **kwargs)
        start = time.perf_counter()
        for _ in range(repeats):
            model.generate(**encoded, **kwargs)
    return (time.perf_counter() - start) * 1000 / (repeats * new_tokens)


def quality_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, latency: bool = True) -> dict[str, Any]:
    """Rule score, perplexity, parameter count, sparsity and (optionally) latency of a loaded model."""
    from rlhf.evaluation import progress

    with progress.section("quality · held-out rule score"):  # batch bars on stderr: minutes on a real model
        rule_score = held_out_rule_score(model, tokenizer)
    with progress.section("quality · perplexity"):
        report: dict[str, Any] = {"rule_score": rule_score, "perplexity": pretrain_perplexity(model, tokenizer)}
    report.update(parameters=parameter_count(model), **sparsity(model))
    if latency:
        report["latency_ms_per_token"] = latency_ms_per_token(model, tokenizer)
    return report
