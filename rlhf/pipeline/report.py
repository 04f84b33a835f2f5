"""The pipeline's final report: headline table, per-stage times, lineage and plots (report.md + report.html)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rlhf.compress import latency_ms_per_token, weights_size_bytes
from rlhf.config import ModelArguments
from rlhf.evaluation.report import headline_value, markdown_table, markdown_to_html
from rlhf.modeling import load_causal_lm, load_tokenizer
from rlhf.pipeline.spec import Pipeline
from rlhf.plots import plot_histograms, pyplot, save_figure

HEADLINE_COLUMNS = [
    ("rule score", "rule_reward"),
    ("reward-model score", "reward_model_score"),
    ("win-rate vs reference", "win_rate"),
    ("KL to reference", "kl"),
    ("perplexity", "perplexity"),
    ("refusal (harmful)", "refusal_rate"),
    ("false refusal", "false_refusal_rate"),
    ("IFEval prompt-level strict", "ifeval_prompt_strict"),
    ("IFEval instruction-level strict", "ifeval_instruction_strict"),
    ("response tokens", "response_tokens"),
]


def headline_columns(results: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """HEADLINE_COLUMNS that some model has, then the same metrics from later eval stages (`key (stage)`)."""
    present = {key for result in results.values() for key in result.get("metrics", {})}
    columns = [(title, key) for title, key in HEADLINE_COLUMNS if key in present]
    for title, key in HEADLINE_COLUMNS:
        columns += [(f"{title} ({k[len(key) + 2 : -1]})", k) for k in sorted(present) if k.startswith(f"{key} (")]
    return columns


def _eval_results(pipeline: Pipeline) -> tuple[dict[str, dict[str, Any]], Path | None]:
    """Merged per-model results of every eval stage in the pipeline, and the last eval dir.

    A model evaluated by several eval stages keeps the first stage's result; a later stage's metrics
    join it as `key (stage)` (e.g. the same scores on held-out constraint types).
    """
    results: dict[str, dict[str, Any]] = {}
    last = None
    for spec in pipeline.stages:
        path = pipeline.stage_dir(spec.name) / "eval.json"
        if spec.command == "eval" and path.exists():
            for name, result in json.loads(path.read_text())["results"].items():
                if name not in results:
                    results[name] = result
                else:
                    later = {f"{key} ({spec.name})": value for key, value in result.get("metrics", {}).items()}
                    results[name]["metrics"] = {**results[name].get("metrics", {}), **later}
            last = path.parent
    return results, last


def _latency(pipeline: Pipeline, name: str) -> float | None:
    """CPU generation latency (ms/token, batch 1) of a stage's model, measured once per fingerprint."""
    stage_dir = pipeline.stage_dir(name)
    lineage = stage_dir / "lineage.json"
    if not (stage_dir / "config.json").exists() or not lineage.exists():
        return None
    cache_path = pipeline.state_dir / "latency.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = f"{name}:{json.loads(lineage.read_text()).get('fingerprint')}"
    if key not in cache:
        args = ModelArguments(model_name_or_path=str(stage_dir))
        cache[key] = latency_ms_per_token(load_causal_lm(args), load_tokenizer(args))
        cache_path.write_text(json.dumps(cache, indent=2))
    return cache[key]


def _plot_bars(results: dict[str, dict[str, Any]], key: str, title: str, path: Path) -> Path | None:
    names = [n for n, r in results.items() if r.get("metrics", {}).get(key) is not None]
    if not names:
        return None
    fig, ax = pyplot().subplots(figsize=(max(4, 1.1 * len(names)), 3))
    ax.bar(names, [results[n]["metrics"][key] for n in names], color="#4C72B0")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)


def _plot_reward_distributions(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    scored = {n: r["scores"]["reward_model"] for n, r in results.items() if (r.get("scores") or {}).get("reward_model")}
    return plot_histograms(scored, "reward-model score of generated responses", path)


def _lineage_lines(lineage: dict[str, Any], depth: int = 0) -> list[str]:
    line = f"{'  ' * depth}- **{lineage.get('stage')}** ({lineage.get('recipe') or lineage.get('command') or 'input'})"
    if lineage.get("fingerprint"):
        line += f" `{lineage['fingerprint']}`"
    lines = [line]
    for parent in (lineage.get("inputs") or {}).values():
        lines += _lineage_lines(parent, depth + 1)
    return lines


def write_report(pipeline: Pipeline, summary: dict[str, Any]) -> Path:
    """Write `<output_dir>/report.md` and `report.html`; return the Markdown path."""
    out = pipeline.output_dir
    plots = out / "report_plots"
    if plots.exists():
        shutil.rmtree(plots)
    plots.mkdir(parents=True)
    results, eval_dir = _eval_results(pipeline)
    lines = [f"# Pipeline report: {pipeline.name}", ""]

    lines += ["## Headline", ""]
    columns = headline_columns(results)
    header = ["model", *(title for title, _ in columns), "weights size", "latency (ms/token)"]
    rows = []
    for name, result in results.items():
        metrics = result.get("metrics", {})
        stage_dir = pipeline.stage_dir(name)
        size = f"{weights_size_bytes(stage_dir) / 2**20:.2f} MiB" if stage_dir.is_dir() else None
        latency = _latency(pipeline, name)
        rows.append([name, *(headline_value(metrics, key) for _, key in columns), size, latency])
    lines += markdown_table(header, rows) if rows else ["(no eval stage in this pipeline)", ""]

    lines += ["## Stages", ""]
    stage_rows = []
    for name, info in summary["stages"].items():
        stage_rows.append([name, info["status"], info.get("seconds"), info.get("fingerprint")])
    lines += markdown_table(["stage", "this run", "seconds (when it ran)", "fingerprint"], stage_rows)
    lines += [
        f"Wall time of this run from planning to the last stage: {summary.get('seconds', 0):.1f} s "
        "(this report, with its latency measurements, comes after)",
        "",
    ]
    events = [
        [spec.name, event["step"], event["alarm"], event["action"], event["message"]]
        for spec in pipeline.stages
        if spec.recipe and (pipeline.stage_dir(spec.name) / "metrics.json").exists()
        for event in json.loads((pipeline.stage_dir(spec.name) / "metrics.json").read_text()).get("health_events") or []
    ]
    if events:  # training-health alarms (rlhf.callbacks.HealthCallback) that warned during the run
        lines += ["## Health alarms", ""]
        lines += markdown_table(["stage", "step", "alarm", "action", "what happened"], events)

    lines += ["## Plots", ""]
    figures = [
        _plot_bars(results, "rule_reward", "rule-based score (held-out prompts)", plots / "rule_score.png"),
        _plot_bars(results, "reward_model_score", "mean reward-model score", plots / "reward_model_score.png"),
        _plot_reward_distributions(results, plots / "reward_distributions.png"),
    ]
    for result in results.values():
        for curve in result.get("training_curves") or []:
            if os.path.exists(curve):
                figures.append(Path(shutil.copy(curve, plots / Path(curve).name)))
    for spec in pipeline.stages:
        if spec.command == "attention" and pipeline.stage_dir(spec.name).is_dir():
            for png in sorted(pipeline.stage_dir(spec.name).glob("*.png"))[:2]:
                figures.append(Path(shutil.copy(png, plots / f"attention_{png.name}")))
    for figure in filter(None, figures):
        lines += [f"![{figure.stem}]({figure.relative_to(out)})", ""]

    final = next((s for s in reversed(pipeline.stages) if s.recipe and pipeline.stage_dir(s.name).is_dir()), None)
    if final is not None:
        lineage_path = pipeline.stage_dir(final.name) / "lineage.json"
        if lineage_path.exists():
            lines += [f"## Lineage of `{final.name}`", ""]
            lines += _lineage_lines(json.loads(lineage_path.read_text())) + [""]
    if eval_dir is not None:
        lines += [f"Full evaluation report: [{eval_dir.name}/report.md]({eval_dir.relative_to(out)}/report.md)", ""]

    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(markdown_to_html(text))
    return out / "report.md"
