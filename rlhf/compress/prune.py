"""Pruning: unstructured magnitude sparsity, or structured removal of MLP neurons / attention heads.

rlhf prune outputs/tiny/sft --method magnitude --sparsity 0.5 --output outputs/tiny/sft-sparse \
    --recovery-recipe recipes/tiny/sft.yaml --recovery-steps 200
rlhf prune outputs/tiny/sft --method structured --mlp-keep 0.5 --heads-keep 0.75 --output outputs/tiny/sft-slim

`magnitude` zeroes the smallest-magnitude weights of the transformer blocks' linear layers (one
global threshold, torch.nn.utils.prune) and saves an ordinary dense safetensors checkpoint: the
file is as large as before (zeros still take space), the win is for sparse kernels/compression.
`structured` removes whole MLP neurons (gate/up rows and down columns) and whole attention heads
with the smallest weight norms, the same number in every layer (Llama-style configs hold one
`intermediate_size` and one head count for all layers), so the config, the parameter count and the
file shrink. Heads are pruned only for multi-head attention (num_key_value_heads equal to
num_attention_heads); grouped-query attention would need heads removed per KV group.

An optional recovery fine-tune reuses the SFT stage's recipe format (`--recovery-recipe`, default:
the checkpoint's own recipe.yaml when it is an SFT output). During recovery the pruning masks stay
attached, so pruned weights receive no update and the sparsity is still exact at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from trl import ModelConfig

from rlhf.compress import REPORT_FILE, linear_weights, quality_report, weights_size_bytes
from rlhf.compress import sparsity as sparsity_of
from rlhf.config import RecipeError

if TYPE_CHECKING:  # torch, transformers, TRL and the loaders load when a model is pruned, not for --help
    import torch
    from transformers import PreTrainedModel

METHODS = ("magnitude", "structured")
# Model types whose blocks are `mlp.{gate,up,down}_proj` and `self_attn.{q,k,v,o}_proj` with one
# intermediate size and one head count in the config.
STRUCTURED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_request(
    checkpoint: str,
    method: str,
    sparsity: float | None = None,
    mlp_keep: float | None = None,
    heads_keep: float | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Validate the pruning arguments against the checkpoint's config, before the model loads."""
    if method not in METHODS:
        raise RecipeError(f"--method: got {method!r}, expected one of {', '.join(METHODS)}.")
    if method == "magnitude":
        if sparsity is None or not 0 < sparsity < 1:
            raise RecipeError("--sparsity: magnitude pruning needs a fraction of weights to zero, e.g. 0.5.")
        return
    if mlp_keep is None and heads_keep is None:
        raise RecipeError("--mlp-keep/--heads-keep: structured pruning needs one of them, e.g. --mlp-keep 0.5.")
    for name, value in (("--mlp-keep", mlp_keep), ("--heads-keep", heads_keep)):
        if value is not None and not 0 < value <= 1:
            raise RecipeError(f"{name}: got {value}, expected the fraction to keep, in (0, 1].")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    if config.model_type not in STRUCTURED_MODEL_TYPES:
        raise RecipeError(
            f"--method structured supports {', '.join(STRUCTURED_MODEL_TYPES)} models; {checkpoint} is "
            f"{config.model_type!r}. Use --method magnitude."
        )
    if heads_keep is not None and config.num_key_value_heads != config.num_attention_heads:
        raise RecipeError(
            f"--heads-keep: {checkpoint} uses grouped-query attention ({config.num_attention_heads} query heads, "
            f"{config.num_key_value_heads} key/value heads); only --mlp-keep is supported for it."
        )


def magnitude_prune(model: PreTrainedModel, amount: float) -> list[tuple[torch.nn.Module, str]]:
    """Attach masks zeroing the `amount` smallest-magnitude block linear weights (one global threshold)."""
    from torch.nn.utils import prune as torch_prune

    parameters = [(module, "weight") for _, module in linear_weights(model)]
    torch_prune.global_unstructured(parameters, pruning_method=torch_prune.L1Unstructured, amount=amount)
    return parameters


def make_permanent(parameters: list[tuple[torch.nn.Module, str]]) -> None:
    """Fold masks into the weights so the model saves as an ordinary checkpoint."""
    from torch.nn.utils import prune as torch_prune

    for module, name in parameters:
        torch_prune.remove(module, name)


def _sliced_linear(layer: torch.nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.nn.Linear:
    import torch

    weight = layer.weight.data
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    new = new.to(dtype=weight.dtype, device=weight.device)
    new.weight.data.copy_(weight)
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.data[rows] if rows is not None else layer.bias.data)
    return new


def prune_mlp_neurons(model: PreTrainedModel, keep: float) -> int:
    """Keep the `keep` fraction of MLP neurons with the largest gate·up·down weight norms, in every layer."""
    size = model.config.intermediate_size
    kept = max(1, round(size * keep))
    for layer in model.model.layers:
        mlp = layer.mlp
        importance = (
            mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
        )
        index = importance.topk(kept).indices.sort().values
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, index, None)
        mlp.up_proj = _sliced_linear(mlp.up_proj, index, None)
        mlp.down_proj = _sliced_linear(mlp.down_proj, None, index)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = kept
    model.config.intermediate_size = kept
    return kept


def prune_attention_heads(model: PreTrainedModel, keep: float) -> int:
    """Keep the `keep` fraction of attention heads with the largest value/output weight norms, in every layer."""
    import torch

    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kept = max(1, round(heads * keep))
    for layer in model.model.layers:
        attention = layer.self_attn
        value = attention.v_proj.weight.view(heads, head_dim, -1).flatten(1).norm(dim=1)
        output = attention.o_proj.weight.view(-1, heads, head_dim).transpose(0, 1).flatten(1).norm(dim=1)
        chosen = (value * output).topk(kept).indices.sort().values
        index = (chosen[:, None] * head_dim + torch.arange(head_dim)).flatten()
        attention.q_proj = _sliced_linear(attention.q_proj, index, None)
        attention.k_proj = _sliced_linear(attention.k_proj, index, None)
        attention.v_proj = _sliced_linear(attention.v_proj, index, None)
        attention.o_proj = _sliced_linear(attention.o_proj, None, index)
        for name in ("num_heads", "num_key_value_heads"):
            if hasattr(attention, name):
                setattr(attention, name, kept)
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = 1
    # The head size stays; it must be explicit because hidden_size / heads no longer equals it.
    config.head_dim = head_dim
    config.num_attention_heads = config.num_key_value_heads = kept
    return kept


def recovery_argv(checkpoint: str, recipe: str | None, steps: int | None) -> list[str]:
    """The SFT recipe (and overrides) for the recovery fine-tune; raises when there is none to use."""
    if recipe is None:
        own = Path(checkpoint) / "recipe.yaml"
        if not own.exists() or (yaml.safe_load(own.read_text()) or {}).get("stage") != "sft":
            raise RecipeError(
                "--recovery-steps: the checkpoint has no SFT recipe.yaml to take the data and settings from; "
                "pass --recovery-recipe RECIPE.yaml (an SFT recipe, e.g. recipes/tiny/sft.yaml)."
            )
        recipe = str(own)
    # Quoted: a bare `no` reads as YAML false.
    argv = [recipe, "--save_strategy", '"no"', "--eval_strategy", '"no"', "--report_to", "none"]
    return argv + (["--max_steps", str(steps)] if steps else [])


def recover(model: PreTrainedModel, tokenizer: Any, argv: list[str], source: str) -> dict[str, Any]:
    """Fine-tune a pruned model in place with TRL's SFTTrainer, on the recovery recipe's data.

    Masks attached by `magnitude_prune` stay on during training: the forward pass multiplies by
    them, so pruned weights get zero gradient and stay zero.
    """
    from trl import SFTConfig, SFTTrainer

    from rlhf.data import prepare_datasets
    from rlhf.recipe import parse_recipe

    with tempfile.TemporaryDirectory() as scratch:
        recipe = parse_recipe([*argv, "--model_name_or_path", source, "--output_dir", scratch], SFTConfig, stage="sft")
        train_dataset, _, _ = prepare_datasets(recipe.data, "sft", recipe.training.seed)
        trainer = SFTTrainer(model=model, args=recipe.training, train_dataset=train_dataset, processing_class=tokenizer)
        return trainer.train().metrics


def prune(
    checkpoint: str,
    output: str | Path,
    method: str,
    sparsity: float | None = None,
    mlp_keep: float | None = None,
    heads_keep: float | None = None,
    recovery_recipe: str | None = None,
    recovery_steps: int | None = None,
    no_eval: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Prune `checkpoint` into `output` (written atomically), optionally fine-tune to recover; return the report."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from rlhf.artifacts import atomic_output_dir, check_output_dir, write_json
    from rlhf.modeling import check_model_source, load_causal_lm, load_tokenizer
    from rlhf.recipe import parse_recipe

    check_output_dir(output, "--output", inputs=(checkpoint,), writer="prune")
    checkpoint = check_model_source(checkpoint, "CHECKPOINT")
    check_request(checkpoint, method, sparsity, mlp_keep, heads_keep, trust_remote_code)
    recovery = None
    if recovery_recipe or recovery_steps:
        recovery = recovery_argv(checkpoint, recovery_recipe, recovery_steps)
        # Validate the recipe now (against the source checkpoint), not after pruning.
        parse_recipe([*recovery, "--model_name_or_path", checkpoint], SFTConfig, stage="sft")

    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=checkpoint), trust_remote_code)
    model = load_causal_lm(ModelConfig(model_name_or_path=checkpoint), trust_remote_code)
    report: dict[str, Any] = {
        "command": "prune",
        "method": method,
        "sparsity": sparsity,
        "mlp_keep": mlp_keep,
        "heads_keep": heads_keep,
        "output": str(output),
        "recovery_recipe": recovery_recipe,
        "recovery_steps": recovery_steps,
        "no_eval": no_eval,
        "trust_remote_code": trust_remote_code,
        "source": checkpoint,
        "size_bytes_before": weights_size_bytes(checkpoint),
    }
    if not no_eval:
        report["before"] = quality_report(model, tokenizer)

    with atomic_output_dir(output) as tmp:
        masked: list[tuple[torch.nn.Module, str]] = []
        if method == "magnitude":
            masked = magnitude_prune(model, sparsity)
        else:
            if mlp_keep is not None:
                report["intermediate_size"] = prune_mlp_neurons(model, mlp_keep)
            if heads_keep is not None:
                report["num_attention_heads"] = prune_attention_heads(model, heads_keep)
        if recovery:
            if not no_eval:
                report["pruned_before_recovery"] = quality_report(model, tokenizer, latency=False)
            report["recovery"] = recover(model, tokenizer, recovery, checkpoint)
        make_permanent(masked)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        probe = torch.arange(2, min(model.config.vocab_size, 34)).unsqueeze(0)
        with torch.no_grad():
            difference = float((reloaded(probe).logits - model.eval()(probe).logits).abs().max())
        if difference > 1e-4:
            raise RecipeError(
                f"the pruned checkpoint does not reload to the same model (logits differ by {difference:.3g})."
            )
        report["size_bytes_after"] = weights_size_bytes(tmp)
        report["parameters_after"] = sum(p.numel() for p in reloaded.parameters())
        report.update(sparsity_of(reloaded))
        if not no_eval:
            report["after"] = quality_report(reloaded, tokenizer)
        write_json(tmp / REPORT_FILE, report)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`rlhf prune CHECKPOINT --method magnitude|structured ... --output DIR`."""
    parser = argparse.ArgumentParser(prog="rlhf prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--method", required=True, help="magnitude (unstructured) or structured")
    parser.add_argument("--sparsity", type=float, help="magnitude: fraction of block linear weights to zero")
    parser.add_argument("--mlp-keep", type=float, help="structured: fraction of MLP neurons to keep")
    parser.add_argument("--heads-keep", type=float, help="structured: fraction of attention heads to keep")
    parser.add_argument("--output", required=True, help="output checkpoint directory")
    parser.add_argument("--recovery-recipe", help="SFT recipe to fine-tune the pruned model with")
    parser.add_argument("--recovery-steps", type=int, help="recovery fine-tune steps (max_steps)")
    parser.add_argument("--no-eval", action="store_true", help="skip the quality measurements")
    parser.add_argument("--trust-remote-code", action="store_true")
    return prune(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
