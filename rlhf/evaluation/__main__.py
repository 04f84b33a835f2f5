"""`python -m rlhf.evaluation CHECKPOINT --recipe recipes/tiny/eval.yaml`."""

from rlhf.entrypoint import run
from rlhf.evaluation.runner import main

run(main)
