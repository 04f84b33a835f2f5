"""rlhf: a thin recipe layer over transformers, TRL, PEFT and accelerate for the whole RLHF pipeline."""

from rlhf.quiet import install as _hide_library_noise

__version__ = "0.1.0"

# Before any submodule imports torch, transformers or DeepSpeed: their start-up lines are filtered by name.
_hide_library_noise()
