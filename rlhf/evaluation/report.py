"""Plots (matplotlib, Agg) and the human-readable report (Markdown, optionally HTML) of an evaluation."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rlhf.plots import plot_histograms, pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Headline metrics, in table order: (key, label, higher is better?)
HEADLINE = [
    ("rule_reward", "rule reward (mean)", True),
    ("ifeval_prompt_strict", "IFEval prompt-level strict", True),
    ("ifeval_instruction_strict", "IFEval instruction-level strict", True),
    ("reward_model_score", "reward-model score (mean)", True),
    ("win_rate", "win-rate vs reference", True),
    ("kl", "KL to reference (nats/seq)", None),
    ("exact_match", "exact match", True),
    ("response_tokens", "response length (tokens)", None),
    ("distinct_1", "distinct-1", True),
    ("distinct_2", "distinct-2", True),
    ("repetition_rate", "repetition rate", False),
    ("refusal_rate", "safety: refusal rate (harmful)", True),
    ("harmful_compliance_rate", "safety: harmful compliance", False),
    ("false_refusal_rate", "safety: false refusal (benign)", False),
    ("robustness_mean_drop", "robustness: mean score drop", False),
    ("pairwise_accuracy", "reward model pairwise accuracy", True),
    ("perplexity", "perplexity", False),
]
RATE_KEYS = [
    "rule_reward",
    "ifeval_prompt_strict",
    "ifeval_instruction_strict",
    "win_rate",
    "exact_match",
    "refusal_rate",
    "harmful_compliance_rate",
    "false_refusal_rate",
]


def headline_value(metrics: dict[str, Any], key: str) -> Any:
    """A headline metric as a table shows it: the win-rate with its 95% interval, when it has one."""
    value = metrics.get(key)
    if key == "win_rate" and value is not None and "win_rate_low" in metrics:
        return f"{value:.3f} [{metrics['win_rate_low']:.2f}, {metrics['win_rate_high']:.2f}]"
    return value


# ------------------------------------------------------------------------------------------------ plots


def plot_comparison(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars of the rate-like headline metrics (0…1) for every evaluated model."""
    keys = [k for k in RATE_KEYS if any(k in r["metrics"] for r in results.values())]
    if not keys:
        return None
    fig, ax = pyplot().subplots(figsize=(max(6, 1.3 * len(keys)), 3.8))
    width = 0.8 / len(results)
    for i, (name, result) in enumerate(results.items()):
        values = [result["metrics"].get(k, 0.0) for k in keys]
        bars = ax.bar([j + i * width for j in range(len(keys))], values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title("headline metrics (rates)")
    return save_figure(fig, path)


def helpful_harmless_figure(results: dict[str, dict[str, Any]]) -> Figure | None:
    """The trade-off picture: each model at (harmful requests refused, benign look-alikes answered).

    Models name their markers in a legend below the axes, not in labels beside the points: RLHF models
    cluster at the top right, where labels overlapped. Models on the same spot (within 0.02) share one
    marker and one legend entry.
    """
    points = {
        name: (r["metrics"]["refusal_rate"], 1.0 - r["metrics"]["false_refusal_rate"])
        for name, r in results.items()
        if "refusal_rate" in r["metrics"] and "false_refusal_rate" in r["metrics"]
    }
    if not points:
        return None
    clusters: list[tuple[tuple[float, float], list[str]]] = []
    for name, point in points.items():
        near = next((c for c in clusters if math.dist(c[0], point) <= 0.02), None)
        if near is None:
            clusters.append((point, [name]))
        else:
            near[1].append(name)
    fig, ax = pyplot().subplots(figsize=(5.2, 4.4 + 0.2 * len(clusters)))
    for i, ((harmless, helpful), names) in enumerate(clusters):
        marker = "osD^vP*X"[i // 10 % 8]  # the colour cycle has 10 colours; the marker tells the next 10 apart
        label = f"{', '.join(names)} ({harmless:.2f}, {helpful:.2f})"
        ax.scatter([harmless], [helpful], s=45, marker=marker, label=label, alpha=0.85)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("harmless: harmful requests refused")
    ax.set_ylabel("helpful: benign look-alikes answered (1 − false refusal)")
    ax.axhline(0.9, color="grey", linewidth=0.5, linestyle=":")
    ax.axvline(0.95, color="grey", linewidth=0.5, linestyle=":")
    ax.set_title("helpful vs harmless (top right is best)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=7, frameon=False)
    return fig


def plot_helpful_harmless(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """`helpful_harmless_figure` written to `path` (None when no model has safety metrics)."""
    fig = helpful_harmless_figure(results)
    return save_figure(fig, path) if fig is not None else None


def plot_grouped(data: dict[str, dict[str, float]], title: str, ylabel: str, path: Path) -> Path | None:
    """Grouped bars: `data[model][group]` → value."""
    groups = sorted({g for values in data.values() for g in values})
    if not groups:
        return None
    fig, ax = pyplot().subplots(figsize=(max(6, 1.1 * len(groups)), 3.5))
    width = 0.8 / len(data)
    for i, (name, values) in enumerate(data.items()):
        ax.bar([j + i * width for j in range(len(groups))], [values.get(g, 0.0) for g in groups], width, label=name)
    ax.set_xticks([j + width * (len(data) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=8, rotation=20)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> Path | None:
    """Histogram of response lengths (tokens) per model."""
    return plot_histograms(lengths, "response lengths", path, xlabel="response length (tokens)")


# ------------------------------------------------------------------------------------------------ report


def format_value(value: Any) -> str:
    """A table cell's text: 3 decimals for small floats, 3 significant digits from 100, thousands grouped from 1000."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) >= 100 or value == 0 else f"{value:.3f}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table's lines (values through `format_value`), then a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(format_value(c)) for c in row) + " |" for row in rows]
    return lines + [""]


def write_report(output_dir: Path, evaluation: dict[str, Any], html_too: bool = False) -> list[Path]:
    """Write plots, report.md (and report.html) for an evaluation dict as saved in eval.json."""
    results: dict[str, dict[str, Any]] = evaluation["results"]
    plots_dir = output_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    names = list(results)
    lines = ["# Evaluation report", ""]
    lines += [f"- **{name}**: `{r['checkpoint']}` ({r['seconds']:.1f} s)" for name, r in results.items()]
    lines.append("")

    lines += ["## Summary", ""]
    rows = []
    for key, label, better in HEADLINE:
        if any(key in r["metrics"] for r in results.values()):
            arrow = {True: " ↑", False: " ↓", None: ""}[better]
            rows.append([label + arrow, *[headline_value(r["metrics"], key) for r in results.values()]])
    lines += markdown_table(["metric", *names], rows)
    figures = []
    comparison = plot_comparison(results, plots_dir / "comparison.png")
    if comparison:
        figures.append(("headline rates", comparison))
    trade_off = plot_helpful_harmless(results, plots_dir / "helpful_harmless.png")
    if trade_off:
        figures.append(("helpful vs harmless", trade_off))
    by_kind = {n: r["generation"]["rule_reward_by_group"] for n, r in results.items() if "generation" in r}
    if any(by_kind.values()):
        figures.append(
            (
                "rule reward by prompt kind",
                plot_grouped(by_kind, "rule reward by prompt kind", "mean reward", plots_dir / "reward_by_kind.png"),
            )
        )
    drops = {n: r["robustness"]["drop"] for n, r in results.items() if "robustness" in r}
    if drops:
        figures.append(
            (
                "robustness",
                plot_grouped(drops, "score drop under perturbation", "clean − perturbed", plots_dir / "robustness.png"),
            )
        )
    safety = {
        n: {c: e["refusal_rate"] for c, e in r["safety"]["categories"].items()}
        for n, r in results.items()
        if "safety" in r
    }
    if safety:
        figures.append(
            (
                "refusal rate by category",
                plot_grouped(safety, "refusal rate by suite category", "refusal rate", plots_dir / "safety.png"),
            )
        )
    lengths = {n: r["generation"]["lengths"] for n, r in results.items() if "generation" in r}
    if lengths:
        figures.append(("response lengths", plot_lengths(lengths, plots_dir / "lengths.png")))
    for title, path in figures:
        if path:
            lines += [f"![{title}](plots/{path.name})", ""]

    for name, result in results.items():
        lines += [f"## {name}", ""]
        for skipped, why in result.get("skipped", {}).items():
            lines.append(f"- {skipped}: skipped ({why})")
        if result.get("skipped"):
            lines.append("")
        if "generation" in result:
            generation = result["generation"]
            lines += [f"### Generation ({generation['num_prompts']} prompts)", ""]
            if generation["rule_reward_by_group"]:
                lines += markdown_table(
                    ["prompt kind", "rule reward"], sorted(generation["rule_reward_by_group"].items())
                )
            if "win_rate" in result:
                w = result["win_rate"]
                lines += [
                    f"Win-rate vs `{w['reference']}` judged by {w['judge']}: **{w['win_rate']:.3f}** "
                    f"(95% interval {w['low']:.3f}–{w['high']:.3f}; {w['wins']} wins, {w['ties']} ties, "
                    f"{w['losses']} losses; a tie counts half).",
                    "",
                ]
            if "kl" in result:
                k = result["kl"]
                lines += [
                    f"KL to `{k['reference']}`: {k['kl']:.4f} nats/sequence ({k['kl_per_token']:.4f}/token, on {k['num_samples']} policy samples).",
                    *([f"**Unreliable:** {k['unreliable']}."] if "unreliable" in k else []),
                    "",
                ]
            lines += ["Samples:", ""]
            lines += markdown_table(
                ["prompt", "response", "rule reward"],
                [[s["prompt"], s["response"], s.get("rule_reward")] for s in result["samples"]],
            )
        if "safety" in result:
            s = result["safety"]
            lines += [f"### Safety ({s['num_harmful']} harmful, {s['num_benign']} benign prompts)", ""]
            lines += [
                f"Refusal rate on harmful prompts **{s['refusal_rate']:.3f}**, harmful compliance "
                f"**{s['harmful_compliance_rate']:.3f}**, false refusals on benign look-alikes **{s['false_refusal_rate']:.3f}**. "
                "Refusal as a classifier of harmful prompts: "
                + ", ".join(f"{k} {v:.3f}" for k, v in s["refusal_classifier"].items()),
                "",
            ]
            lines += markdown_table(
                ["category", "label", "prompts", "refusal rate"],
                [[c, e["label"], e["count"], e["refusal_rate"]] for c, e in sorted(s["categories"].items())],
            )
            lines += markdown_table(
                ["suite prompt", "label", "response", "refused"],
                [[x["prompt"], x["label"], x["response"], x["refused"]] for x in s["samples"]],
            )
        if "robustness" in result:
            r = result["robustness"]
            lines += [f"### Robustness (judge: {r['judge']}, per-word probability {r['probability']})", ""]
            lines += markdown_table(
                ["perturbation", "score", "drop"],
                [["clean", r["clean"], 0.0], *[[p, r["perturbed"][p], r["drop"][p]] for p in r["perturbed"]]],
            )
        if "reward_model" in result:
            rm = result["reward_model"]
            lines += [
                "### Reward model",
                "",
                f"Pairwise accuracy on {rm['num_pairs']} preference pairs: **{rm['pairwise_accuracy']:.3f}** (mean margin {rm['mean_margin']:.3f}).",
                "",
            ]
        if "perplexity" in result:
            p = result["perplexity"]
            lines += [
                "### Perplexity",
                "",
                f"Perplexity **{p['perplexity']:.3f}** over {p['tokens']} tokens of `{p['dataset']}`.",
                "",
            ]
        for curve in result.get("training_curves", []):
            lines += [f"![training curve](plots/{Path(curve).name})", ""]

    lines += [
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(evaluation["config"], sort_keys=False).strip(),
        "```",
        "",
    ]
    written = [output_dir / "report.md"]
    written[0].write_text("\n".join(lines))
    if html_too:
        written.append(output_dir / "report.html")
        written[1].write_text(markdown_to_html("\n".join(lines)))
    return written


def markdown_to_html(text: str) -> str:
    """Render the subset of Markdown the report uses (headings, lists, tables, images, bold, code)."""

    def inline(s: str) -> str:
        s = html.escape(s.replace("\\|", "|"))
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    out = [
        "<!doctype html><meta charset='utf-8'><title>Evaluation report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}</style>",
    ]
    lines, i = text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(html.escape(lines[i]))
                i += 1
            out.append("<pre>" + "\n".join(block) + "</pre>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                table.append(lines[i])
                i += 1
            cells = [re.split(r"(?<!\\)\|", row.strip()[1:-1]) for row in table if not row.startswith("|---")]
            out.append("<table>")
            for r, row in enumerate(cells):
                tag = "th" if r == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{inline(c.strip())}</{tag}>" for c in row) + "</tr>")
            out.append("</table>")
            continue
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(out)
