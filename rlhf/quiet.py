"""Quiet by default: start-up lines from libraries that a user cannot act on are hidden, each one by name.

`rlhf --verbose <command>` (or `RLHF_VERBOSE=1`, which launched processes inherit) shows everything.
Each entry names one logger or warning and one message, so nothing else from that library is hidden;
nothing redirects stderr. Imports only the standard library: `import rlhf` installs the filters before
torch, transformers or DeepSpeed log anything.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "RLHF_VERBOSE"

# Log records dropped unless verbose: the logger that emits them and regular expressions searched in the message.
LOG_NOISE: dict[str, tuple[str, ...]] = {
    # torchao's wheel ships CUDA kernels (_C_mxfp8, _C_cutlass_90a) that a CPU-only torch cannot load; its
    # CPU code runs without them.
    "torchao": (r"^Failed to load \S*_C\w*\S*\.so: ",),
    # torchao registers its Enum classes with torch's pytree, which torch 2.13 deprecates (torchao/utils.py).
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported",),
    # DeepSpeed's import (transformers and accelerate import it when it is installed) says it found no GPU.
    "DeepSpeed": (r"^Setting accelerator to CPU",),
    # PPO's checkpoints (Accelerator.save_state) store a tied LM head once: the tie is in the model, and
    # loading the embedding restores the head. Any other shared tensor is still reported.
    "accelerate.utils.other": (r"Removed shared tensor \{'[\w.]*lm_head\.weight'\} while saving",),
    # A reward or value model started from a causal LM gets a new score head: transformers reports it as
    # missing. The report is dropped only when the score head is all it lists.
    "transformers.modeling_utils": (
        r"(?sm)ForSequenceClassification\S* LOAD REPORT(?!.*^(?!Key\b|score\.)[\w.]+ *\|)",
    ),
}
# Warnings ignored unless verbose: (category, regular expression matched at the start of the message).
WARNING_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # TRL 1.16's generation helper (trl.models.utils._unwrap_model_for_generation, used by GRPO, RLOO and
    # online DPO) reads transformers' deprecated `is_gradient_checkpointing`; nothing of ours calls it.
    (FutureWarning, re.escape("`is_gradient_checkpointing` is deprecated")),
)


def is_verbose() -> bool:
    """Whether the user asked to see every library line (`--verbose` or RLHF_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _DropNoise(logging.Filter):
    """Drops a logger's records whose message matches one of `patterns`, unless verbose."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if is_verbose():
            return True
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def _is_ours(entry: tuple) -> bool:
    """Whether a `warnings.filters` entry is one that `install` added."""
    action, message, category = entry[:3]
    pattern = getattr(message, "pattern", None)
    return action == "ignore" and any(category is c and pattern == p for c, p in WARNING_NOISE)


def install() -> None:
    """Hide the listed noise (idempotent). Log filters check verbosity per record; warnings filters are added
    only when not verbose (`show_everything` removes them)."""
    for name, patterns in LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(patterns))
    if not is_verbose() and not any(_is_ours(entry) for entry in warnings.filters):
        for category, pattern in WARNING_NOISE:
            warnings.filterwarnings("ignore", message=pattern, category=category)


def show_everything() -> None:
    """Verbose from now on, in this process and the processes it starts."""
    os.environ[VERBOSE_ENV] = "1"
    warnings.filters[:] = [entry for entry in warnings.filters if not _is_ours(entry)]
    mutated = getattr(warnings, "_filters_mutated", None)  # drop the per-module caches of already-seen warnings
    if mutated is not None:
        mutated()
