"""Attention maps: `rlhf attention CHECKPOINT --text "..." --output DIR [--layers 0,1] [--heads 0,2]`.

Loads the model with eager attention (the fused kernels never materialise the weights), runs one
forward pass with `output_attentions=True`, and writes one PNG per layer (a grid with a subplot
per head, tokens on both axes) plus `top_tokens.json`: for every layer and head, the tokens that
receive the most attention on average over the query positions that can see them.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import ModelConfig

from rlhf.config import RecipeError

if TYPE_CHECKING:  # torch and the model loaders load when a map is drawn, not for --help
    import torch


def _indices(spec: str | None, count: int, name: str) -> list[int]:
    if not spec:
        return list(range(count))
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise RecipeError(f"--{name}: {spec!r} is not a comma-separated list of numbers, e.g. 0,2.") from None
    bad = [v for v in values if not -count <= v < count]
    if bad:
        raise RecipeError(f"--{name}: {bad} out of range; the model has {count} {name} (0…{count - 1}).")
    return sorted({v % count for v in values})


def attention_maps(model: Any, tokenizer: Any, text: str) -> tuple[list[str], torch.Tensor]:
    """(token strings, attentions [layers, heads, seq, seq]) of `model` on `text`."""
    import torch

    encoded = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model(**encoded, output_attentions=True)
    if not output.attentions or output.attentions[0] is None:
        raise RecipeError("this model returned no attention weights; it needs attn_implementation='eager' support.")
    attentions = torch.stack([a[0].float().cpu() for a in output.attentions])
    tokens = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])]
    return tokens, attentions


def top_attended(attentions: torch.Tensor, tokens: list[str], k: int = 5) -> list[dict[str, Any]]:
    """The k tokens receiving the most attention from one head's [seq, seq] map (mean over the queries that see them)."""
    import torch

    seq = attentions.shape[-1]
    # Under a causal mask key j is visible to queries j…seq-1 only; divide by that count, not by seq.
    visible = torch.arange(seq, 0, -1, dtype=attentions.dtype)
    received = attentions.sum(dim=0) / visible
    values, positions = received.topk(min(k, seq))
    return [{"index": int(i), "token": tokens[int(i)], "weight": float(v)} for v, i in zip(values, positions)]


def plot_layer(attentions: torch.Tensor, tokens: list[str], heads: list[int], title: str, path: Path) -> Path:
    """One PNG: a subplot per head of a layer's attention, keys on x, queries on y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(heads))
    rows = math.ceil(len(heads) / columns)
    size = 1.2 + 0.22 * len(tokens)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    labels = [t.replace("\n", "\\n") or "␣" for t in tokens]
    for ax, head in zip(axes.flat, heads):
        ax.imshow(attentions[head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {head}", fontsize=9)
        ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), labels, fontsize=6)
    for ax in list(axes.flat)[len(heads) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def attention(
    checkpoint: str,
    text: str,
    output: str | Path,
    layers: str | None = None,
    heads: str | None = None,
    top_k: int = 5,
    trust_remote_code: bool = False,
) -> Path:
    """Write layer_<i>.png grids and top_tokens.json for `text` under `output`."""
    from rlhf.artifacts import atomic_output_dir, check_output_dir, write_json
    from rlhf.modeling import check_model_source, load_causal_lm, load_tokenizer

    if not text.strip():
        raise RecipeError('--text: empty; pass the text to look at, e.g. --text "What color is the zorp?".')
    check_output_dir(output, "--output", inputs=(checkpoint,), writer="attention")
    checkpoint = check_model_source(checkpoint, "CHECKPOINT")
    args = ModelConfig(model_name_or_path=checkpoint, attn_implementation="eager")
    tokenizer = load_tokenizer(args, trust_remote_code)
    model = load_causal_lm(args, trust_remote_code).eval()
    tokens, attentions = attention_maps(model, tokenizer, text)
    layer_ids = _indices(layers, attentions.shape[0], "layers")
    head_ids = _indices(heads, attentions.shape[1], "heads")
    summary: dict[str, Any] = {"checkpoint": checkpoint, "text": text, "tokens": tokens, "layers": {}}
    with atomic_output_dir(output) as tmp:
        for layer in layer_ids:
            plot_layer(attentions[layer], tokens, head_ids, f"layer {layer}", tmp / f"layer_{layer}.png")
            summary["layers"][str(layer)] = {
                str(head): top_attended(attentions[layer, head], tokens, top_k) for head in head_ids
            }
        write_json(tmp / "top_tokens.json", summary)
    return Path(output)


def main(argv: list[str] | None = None) -> None:
    """`rlhf attention CHECKPOINT --text TEXT --output DIR [--layers ..] [--heads ..]`."""
    parser = argparse.ArgumentParser(prog="rlhf attention", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint")
    parser.add_argument("--text", required=True)
    parser.add_argument("--output", required=True, help="directory for layer_<i>.png and top_tokens.json")
    parser.add_argument("--layers", help="comma-separated layer indices (default: all)")
    parser.add_argument("--heads", help="comma-separated head indices (default: all)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--trust-remote-code", action="store_true")
    out = attention(**vars(parser.parse_args(argv)))
    print(f"wrote attention maps to {out}")


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
