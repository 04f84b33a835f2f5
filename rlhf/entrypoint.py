"""How every `python -m rlhf...` module and `rlhf` command runs its `main`: foreseeable failures as one line."""

from __future__ import annotations

import atexit
import errno
import os
import sys
from collections.abc import Callable

from rlhf.config import RecipeError
from rlhf.distributed import shutdown_distributed

RESUME_HINT = "finished outputs are intact; run the same command again to resume"
# Called when a command fails, before its error is reported (artifacts registers the clean-up of
# stage outputs started and not finished; this bottom layer cannot import it).
FAILURE_HOOKS: list[Callable[[], None]] = []


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call a command's main; a user mistake, Ctrl-C or a full disk prints one line instead of a traceback.

    A rank of a multi-process launch that succeeded leaves through `os._exit(0)` once its process group is
    destroyed and the atexit handlers (trackers' final uploads, log flushing) have run: gloo's worker threads
    can still be torn down during interpreter finalization and abort the process ("terminate called without
    an active exception", SIGABRT) after a finished run, which the launcher reports as a failure.
    """
    try:
        try:
            main(argv)
        except BaseException:
            for hook in FAILURE_HOOKS:
                hook()
            raise
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {RESUME_HINT}.", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        where = f" while writing {error.filename}" if error.filename else ""
        print(f"error: the disk is full{where}; free some space, then {RESUME_HINT}.", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed = shutdown_distributed()  # under accelerate launch / torchrun; a no-op in one process
    if distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank a launcher started
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(0)
