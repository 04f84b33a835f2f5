"""Plots written to files (matplotlib, Agg backend): shared by evaluation, the pipeline report and model cards."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only: no display on servers and CI), imported when a plot is
    drawn: every stage imports this module (model cards), and matplotlib adds ~0.5 s to each start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def _series(log_history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(stage_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Loss / reward / KL / learning-rate plots from a stage's trainer_state.json log_history (one PNG each)."""
    state_file = Path(stage_dir) / "trainer_state.json"
    if not state_file.is_file():
        return []
    history = json.loads(state_file.read_text()).get("log_history", [])
    keys = sorted({k for entry in history for k, v in entry.items() if isinstance(v, int | float)})
    groups = {
        "loss": [k for k in keys if k.endswith("loss")],
        "reward": [k for k in keys if "reward" in k or k.endswith(("accuracy", "margin"))],
        "kl": [k for k in keys if re.search(r"(^|[/_])kl($|[/_])", k)],
        "learning_rate": [k for k in keys if k == "learning_rate"],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, group in groups.items():
        series = [(k, *_series(history, k)) for k in group]
        series = [s for s in series if s[1]]
        if not series:
            continue
        fig, ax = pyplot().subplots(figsize=(6, 3.5))
        for key, steps, values in series:
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(f"{Path(stage_dir).name}: {name.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / f"{Path(stage_dir).name}_{name}.png"))
    return written


def plot_histograms(series: dict[str, list[float]], title: str, path: Path, xlabel: str | None = None) -> Path | None:
    """Overlaid histograms, one per named series (None when every series is empty)."""
    if not any(series.values()):
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for name, values in series.items():
        ax.hist(values, bins=20, alpha=0.5, label=name)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)
