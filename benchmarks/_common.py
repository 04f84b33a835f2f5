"""Shared benchmark plumbing: run one arm in a subprocess, read its peak RSS and trainer log, print tables.

Machines are noisy (here: 2 shared CPU cores), so every benchmark alternates its arms, repeats
them, and reports the median of ratios measured in the same run, never absolute times from
different runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def child_env(threads: int) -> dict[str, str]:
    """Environment for a measured child: fixed thread count, offline, quiet."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    return env


def run_child(cmd: Sequence[str], threads: int = 1, log: Path | None = None) -> dict[str, float]:
    """Run `cmd`; return its wall time (s) and its own peak RSS (MB, from wait4's per-child rusage)."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=REPO, env=child_env(threads), stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    if proc.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}\n{tail}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # all threads of the child: robust to other jobs' load
        "peak_rss_mb": usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
    }


def launched(times: Path, *target: str) -> list[str]:
    """Command running `target` (`-m module args…` or `script.py args…`) under benchmarks/_launch.py."""
    times.unlink(missing_ok=True)
    return [PYTHON, str(REPO / "benchmarks/_launch.py"), str(times), *target]


def train_times(times: Path) -> dict[str, float]:
    """CPU and wall seconds spent inside Trainer.train(), as _launch.py recorded them (summed over calls)."""
    records = [json.loads(line) for line in times.read_text().splitlines() if line.strip()]
    return {key: sum(r[key] for r in records) for key in ("train_cpu_s", "train_wall_s")}


def trainer_log(output_dir: str | Path) -> dict[str, Any]:
    """train_runtime, num_tokens, steps and losses from the trainer_state.json a run saved."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    history = state["log_history"]
    final = next(e for e in reversed(history) if "train_runtime" in e)
    tokens = [e["num_tokens"] for e in history if "num_tokens" in e]
    return {
        "train_runtime": final["train_runtime"],
        "num_tokens": max(tokens) if tokens else None,
        "global_step": state["global_step"],
        "losses": [(e["step"], e["loss"], e.get("num_tokens")) for e in history if "loss" in e],
    }


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def ensure_checkpoint(path: Path, **sizes: int) -> Path:
    """A random tiny Llama at `path` (built once; reused across runs)."""
    if not (path / "config.json").exists():
        from rlhf.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(path, **sizes)
    return path


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """'min–max' of a list, for a table cell."""
    return f"{min(values):.3f}–{max(values):.3f}" if len(values) > 1 else "-"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table (pastes into benchmarks/README.md)."""

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")


def machine_note() -> str:
    import platform

    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
