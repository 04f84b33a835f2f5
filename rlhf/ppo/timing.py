"""Where an update's time goes: seconds per part, logged as `timing/*` beside the PPO metrics.

Each part is measured with `time.perf_counter` around the existing calls, on this process alone (a
launch logs rank 0's). On a GPU the device is synchronised at each part's edges, so a part's
asynchronous kernels are counted in that part, not in whichever later call first waits for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The measured parts of an update, in the order they run; `timing/other` is the rest of `timing/update`.
PARTS = (
    "generation",  # sampling the responses
    "policy_forward",  # the rollout policy's log-probs (and entropy)
    "reference_forward",  # the reference's log-probs
    "value_forward",  # the value of every response token
    "reward",  # decoding the responses and scoring them (reward model and reward functions)
    "training",  # forward + loss + backward of the PPO epochs' minibatches
    "optimizer",  # gradient clipping and its checks, optimizer steps
)


class Stopwatch:
    """Seconds spent in each of `PARTS` since the last `reset`."""

    def __init__(self, device: torch.device) -> None:
        self.synchronize = device.type != "cpu"
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def now(self) -> float:
        """`time.perf_counter()` once the device has finished the work queued so far."""
        if self.synchronize:
            torch.accelerator.synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        """Add the time spent in the `with` block to `part`."""
        start = self.now()
        try:
            yield
        finally:
            self.seconds[part] += self.now() - start

    def metrics(self, update_seconds: float) -> dict[str, float]:
        """`timing/<part>` for every part, `timing/other` (the update's time outside them) and `timing/update`."""
        metrics = {f"timing/{part}": seconds for part, seconds in self.seconds.items()}
        metrics["timing/other"] = update_seconds - sum(self.seconds.values())
        metrics["timing/update"] = update_seconds
        return metrics
