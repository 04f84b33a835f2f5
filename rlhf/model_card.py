"""The model card of an output directory: lineage, datasets, eval results, plots, recipe and versions."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from rlhf.plots import plot_training_curves

SECRET_KEYS = ("hub_token",)
REDACTED = "<redacted>"
FRAMEWORKS = ("rlhf", "transformers", "trl", "peft", "accelerate", "datasets", "torch", "huggingface_hub", "tokenizers")


def read_recipe(output_dir: str | Path) -> dict[str, Any]:
    """The resolved recipe.yaml a stage wrote into its output directory ({} when there is none)."""
    path = Path(output_dir) / "recipe.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _is_hub_id(name: str | None) -> bool:
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or ":" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def lineage(output_dir: str | Path, max_depth: int = 20) -> list[dict[str, Any]]:
    """The chain of checkpoints behind an output: each stage's recipe names its parent, ending at a base.

    A parent that is not a local directory but looks like `user/name` is taken to be a Hub id.
    """
    chain: list[dict[str, Any]] = []
    current: str | None = str(output_dir)
    while current and len(chain) < max_depth:
        path = Path(current)
        link = {"path": current, "stage": None, "hub_id": None if path.exists() else current}
        if link["hub_id"] and not _is_hub_id(current):
            link["hub_id"] = None
        chain.append(link)
        if not path.is_dir():
            break
        recipe = read_recipe(path)
        link["stage"] = recipe.get("stage")
        parent = recipe.get("model_name_or_path")
        if not parent and (path / "adapter_config.json").is_file():
            parent = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not parent or any(parent == seen["path"] for seen in chain):
            break
        current = parent
    return chain


def _datasets(recipe: dict[str, Any]) -> list[str]:
    names = [recipe.get("dataset_name"), recipe.get("eval_dataset_name")]
    names += [entry.get("path") for entry in recipe.get("dataset_mixture") or [] if isinstance(entry, dict)]
    return [n for n in dict.fromkeys(names) if n]


def find_eval(output_dir: str | Path) -> tuple[dict[str, float], str | None, Path | None]:
    """Headline metrics of the output from an eval.json (`rlhf eval` layout or a flat {metric: value})."""
    output_dir = Path(output_dir)
    for path in (output_dir / "eval.json", output_dir / "eval" / "eval.json"):
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        dataset = None
        if isinstance(data.get("results"), dict) and data["results"]:
            results = data["results"]
            # Several checkpoints may be compared in one eval: prefer the one that is this directory.
            result = next(
                (r for r in results.values() if Path(str(r.get("checkpoint", ""))).resolve() == output_dir.resolve()),
                next(iter(results.values())),
            )
            metrics = result.get("metrics", {})
            dataset = (data.get("config") or {}).get("prompts_dataset")
        else:
            metrics = data.get("metrics", data)
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return numbers, dataset, path
    return {}, None, None


def training_plots(output_dir: str | Path) -> list[Path]:
    """PNG plots that publish uploads (training curves drawn from trainer_state.json if there are none yet)."""
    output_dir = Path(output_dir)
    # The PNGs publish's allow-list uploads: top level and plots/.
    pngs = sorted([*output_dir.glob("*.png"), *(output_dir / "plots").glob("*.png")])
    if not pngs and (output_dir / "trainer_state.json").is_file():
        pngs = plot_training_curves(output_dir, output_dir / "plots")
    return pngs


def _versions() -> dict[str, str]:
    found = {}
    for name in FRAMEWORKS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def redacted(data: Any) -> Any:
    """`data` with the value of every secret key, at any depth, replaced by a marker."""
    if isinstance(data, dict):
        return {k: (REDACTED if k in SECRET_KEYS and v and v != "set" else redacted(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v) for v in data]
    return data


def build_model_card(output_dir: str | Path, repo_id: str, license: str | None = None) -> Any:
    """A huggingface_hub ModelCard: metadata (base model, datasets, tags, model-index) plus recipe, evals, plots."""
    output_dir = Path(output_dir)
    recipe = read_recipe(output_dir)
    stage = recipe.get("stage")
    chain = lineage(output_dir)
    base_model = next((link["hub_id"] for link in chain[1:] if link["hub_id"]), None)
    datasets = _datasets(recipe)
    is_adapter = (output_dir / "adapter_config.json").is_file()
    metrics, eval_dataset, eval_path = find_eval(output_dir)
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=eval_dataset or "custom",
            dataset_name=eval_dataset or "rlhf eval",
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in metrics.items()
    ]
    tags = ["rlhf", "trl", *([stage] if stage else []), *(["peft", "lora"] if is_adapter else [])]
    data = ModelCardData(
        base_model=base_model,
        datasets=[d for d in datasets if _is_hub_id(d)] or None,
        license=license,
        tags=tags,
        pipeline_tag="text-generation",
        library_name="peft" if is_adapter else "transformers",
        model_name=repo_id,
        eval_results=eval_results or None,
    )

    lines = [f"# {repo_id}", ""]
    what = f"the `{stage}` stage" if stage else "an rlhf pipeline"
    lines += [
        f"This model is the output of {what} of `rlhf`, a thin recipe layer over transformers and TRL.",
        "",
    ]
    if len(chain) > 1:
        lines += ["## Lineage", ""]
        for link in chain:
            label = f"`{link['stage']}` stage" if link["stage"] else "base checkpoint"
            where = f"[{link['hub_id']}](https://huggingface.co/{link['hub_id']})" if link["hub_id"] else link["path"]
            lines.append(f"- {label}: {where}")
        lines.append("")
    lines += ["## Usage", "", "```python", "from transformers import pipeline", ""]
    lines += [f'chat = pipeline("text-generation", model="{repo_id}")']
    lines += ['print(chat([{"role": "user", "content": "Hello!"}], max_new_tokens=64))', "```", ""]
    lines += ["or, with rlhf installed: `rlhf chat " + repo_id + "`.", ""]
    if datasets:
        lines += ["## Training data", "", *[f"- `{d}`" for d in datasets], ""]
    if metrics:
        lines += ["## Evaluation", "", f"From `{eval_path.relative_to(output_dir)}`:", "", "| metric | value |"]
        lines += ["|---|---|", *[f"| {k} | {v:.4g} |" for k, v in metrics.items()], ""]
    plots = training_plots(output_dir)
    if plots:
        lines += ["## Training curves", ""]
        lines += [f"![{p.stem}]({p.relative_to(output_dir).as_posix()})" for p in plots]
        lines.append("")
    if recipe:
        lines += ["## Training recipe", "", "```yaml", yaml.safe_dump(redacted(recipe), sort_keys=False).rstrip()]
        lines += ["```", ""]
    lines += ["## Framework versions", "", *[f"- {k}: {v}" for k, v in _versions().items()], ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)
