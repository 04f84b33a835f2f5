"""`python -m rlhf.evaluation CHECKPOINT --recipe recipes/tiny/eval.yaml`."""

from rlhf.cli import run
from rlhf.evaluation import main

run(main)
