"""How every `python -m rlhf...` module and `rlhf` command runs its `main`: user mistakes as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rlhf.config import RecipeError
from rlhf.distributed import shutdown_distributed


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call a command's main; a user mistake prints one clear line and exits 2 instead of a traceback."""
    try:
        main(argv)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()  # under accelerate launch / torchrun; a no-op in one process
