"""`rlhf pipeline PIPELINE.yaml`: chain stages, cache each one by fingerprint, resume, report.

A pipeline file lists stages in order. A training stage names a recipe; a command stage names an
`rlhf` command (tiny-checkpoint, eval, quantize, prune, export, merge, attention, publish). Each
stage writes `<output_dir>/<name>/`; `inputs:` wires a recipe key (or a command argument) to an
earlier stage's output by name (or a file in it: `samples/sft.jsonl`), so no path is ever copied by hand:

    output_dir: outputs/tiny
    stages:
      - {name: base, command: tiny-checkpoint}
      - {name: sft, recipe: recipes/tiny/sft.yaml, inputs: {model_name_or_path: base}}
      - {name: eval_sft, command: eval, input: sft, args: {recipe: recipes/tiny/eval.yaml}}

A stage is skipped when its output is complete and its fingerprint — resolved recipe, upstream
fingerprints, data — is unchanged; a change reruns it and everything downstream. A killed run,
started again with the same command, skips finished stages and resumes the interrupted one from
its last checkpoint. Modules: spec (the file, wiring, fingerprints) → preflight → run.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

__all__ = ["Pipeline", "StageSpec", "load_pipeline", "main", "run_pipeline"]
# Imported on first use (the run imports torch and the stages' data), so `rlhf pipeline --help` is instant.
_FROM = {"Pipeline": "spec", "StageSpec": "spec", "load_pipeline": "spec", "run_pipeline": "run"}


def __getattr__(name: str) -> Any:
    if name in _FROM:
        return getattr(importlib.import_module(f"rlhf.pipeline.{_FROM[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """`rlhf pipeline PIPELINE.yaml [--only STAGE | --from STAGE] [--force]`."""
    parser = argparse.ArgumentParser(prog="rlhf pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="pipeline YAML, e.g. recipes/tiny/pipeline.yaml")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="run just this stage (its inputs must be finished)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="rerun this stage and every later one")
    parser.add_argument("--force", action="store_true", help="ignore the cache and rerun every selected stage")
    parser.add_argument("--output-dir", help="write the stages here instead of the pipeline file's output_dir")
    args = parser.parse_args(argv)
    from rlhf.pipeline.run import run_pipeline
    from rlhf.pipeline.spec import load_pipeline

    pipeline = load_pipeline(args.pipeline)
    if args.output_dir:
        pipeline.output_dir = Path(args.output_dir)
    run_pipeline(pipeline, only=args.only, start=args.start, force=args.force)
