"""`python -m rlhf.plan RECIPE.yaml [--config ACCELERATE.yaml] ...`."""

from rlhf.entrypoint import run
from rlhf.plan import main

run(main)
