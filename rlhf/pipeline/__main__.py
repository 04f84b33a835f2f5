"""`python -m rlhf.pipeline PIPELINE.yaml`."""

from rlhf.entrypoint import run
from rlhf.pipeline import main

run(main)
