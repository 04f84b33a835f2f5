"""What `rlhf eval` is doing and how far it is, on stderr: a bar per checkpoint over its sections, and under it
a bar per section over its batches (generation, perplexity), both with the time left as tqdm estimates it.

Outside an evaluation (`rlhf generate`, compression reports, tests calling `generate_tokens`) the batch
loops run without a bar: `batches` draws one only inside `section`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

_section: ContextVar[str | None] = ContextVar("rlhf_eval_section", default=None)


def checkpoint_bar(name: str, sections: list[str]) -> Any:
    """The bar of one checkpoint: one step per section; its postfix names the section running."""
    return tqdm(total=len(sections), desc=f"eval {name}", unit="section", file=sys.stderr, dynamic_ncols=True)


@contextmanager
def section(label: str) -> Iterator[None]:
    """Batch loops run inside this block draw a bar described by `label` (e.g. "sft · generation")."""
    token = _section.set(label)
    try:
        yield
    finally:
        _section.reset(token)


def batches(total: int, batch_size: int) -> Iterable[int]:
    """The first index of each batch of `total` items; counted on a bar inside `section`."""
    starts = range(0, total, batch_size)
    label = _section.get()
    if label is None:
        return starts
    return tqdm(starts, desc=label, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
