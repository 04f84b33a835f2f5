"""rlhf: a thin recipe layer over transformers, TRL, PEFT and accelerate for the whole RLHF pipeline."""

__version__ = "0.1.0"
