"""Run a module or script as __main__, recording the CPU and wall time spent inside Trainer.train().

    python benchmarks/_launch.py TIMES.jsonl -m rlhf.stages.sft recipe.yaml
    python benchmarks/_launch.py TIMES.jsonl benchmarks/plain_trl/sft.py --config cfg.yaml

Both arms of a comparison go through this same wrapper, so it costs them the same. CPU time
(process_time: all threads of the process) is far less disturbed by other jobs on a shared
machine than wall time is.
"""

from __future__ import annotations

import json
import runpy
import sys
import time

import transformers

_train = transformers.Trainer.train


def _timed_train(self, *args, **kwargs):
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        return _train(self, *args, **kwargs)
    finally:
        with open(_TIMES, "a") as handle:
            record = {"train_cpu_s": time.process_time() - cpu, "train_wall_s": time.perf_counter() - wall}
            handle.write(json.dumps(record) + "\n")


_TIMES: str = ""

if __name__ == "__main__":
    _TIMES, target, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    transformers.Trainer.train = _timed_train
    if target == "-m":
        module, rest = rest[0], rest[1:]
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        runpy.run_path(target, run_name="__main__")
