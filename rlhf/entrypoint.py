"""How every `python -m rlhf...` module and `rlhf` command runs its `main`: foreseeable failures as one line.

SIGTERM (what SLURM, Kubernetes and spot instances send before they kill a job) takes Ctrl-C's path:
the main thread raises `Terminated`, a KeyboardInterrupt, so the run stops where it is, keeps its last
checkpoint and exits 143 (128 + SIGTERM, as Ctrl-C exits 130) with one line, and the same command resumes.
"""

from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable

from rlhf.config import RecipeError
from rlhf.distributed import say_once, shutdown_distributed

RESUME_HINT = "finished outputs are intact; run the same command again to resume"
# Called when a command fails, before its error is reported (artifacts registers the clean-up of
# stage outputs started and not finished; this bottom layer cannot import it). A hook returns the
# checkpoint the same command resumes from, if it kept one, for the interrupted line.
FAILURE_HOOKS: list[Callable[[], str | None]] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a KeyboardInterrupt, so every Ctrl-C path runs for it too."""


def _raise_terminated(signum: int, frame: object) -> None:
    # The first SIGTERM stops the run; a repeated one must not break off its clean-up (SIGKILL still ends it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def _stop_on_sigterm() -> object | None:
    """Install `_raise_terminated` for SIGTERM; return the handler it replaces (None when left alone).

    An ignored SIGTERM (or one a caller already handles) is left as it is, and only the main thread can set one.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call a command's main; a user mistake, Ctrl-C, SIGTERM or a full disk prints one line instead of a traceback.

    A rank of a multi-process launch that succeeded leaves through `os._exit(0)` once its process group is
    destroyed and the atexit handlers (trackers' final uploads, log flushing) have run: gloo's worker threads
    can still be torn down during interpreter finalization and abort the process ("terminate called without
    an active exception", SIGABRT) after a finished run, which the launcher reports as a failure.
    """
    previous_sigterm = _stop_on_sigterm()
    kept: list[str | None] = []
    try:
        try:
            main(argv)
        except BaseException:
            kept = [hook() for hook in FAILURE_HOOKS]
            raise
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        received, code = ("stopped by SIGTERM", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        checkpoint = next((path for path in kept if path), None)
        # Every rank of a launch gets the signal; rank 0, which keeps the checkpoints, says so.
        say_once(f"\n{received}: {RESUME_HINT}{f' from {checkpoint}' if checkpoint else ''}.", stream=sys.stderr)
        sys.exit(code)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        where = f" while writing {error.filename}" if error.filename else ""
        print(f"error: the disk is full{where}; free some space, then {RESUME_HINT}.", file=sys.stderr)
        sys.exit(1)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        distributed = shutdown_distributed()  # under accelerate launch / torchrun; a no-op in one process
    if distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank a launcher started
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(0)
