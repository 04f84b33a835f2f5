"""Sampled completions as a Markdown table in TensorBoard's text tab, at every log of an online stage."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback


class CompletionTableCallback(TrainerCallback):
    """Every log of an online stage with `report_to: tensorboard`: a Markdown table of sampled completions
    (prompt, response, each reward source's score, GRPO/RLOO's advantage) in TensorBoard's text tab, as
    `completions`.

    TRL's own `log_completions` sends its table to wandb and trackio only (and a parquet file); this
    writes through the TensorBoard callback's SummaryWriter, so the table sits in the same event file.
    It reads the trainer's `_logs` (TRL's record of the sampled completions; PPO's trainer keeps the same).
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.trainer: Any = None

    def bind(self, trainer: Any) -> None:
        """Read the trainer's sampled completions (TRL's `_logs`) and its TensorBoard writer."""
        self.trainer = trainer

    def _writer(self) -> Any:
        handler = getattr(self.trainer, "callback_handler", None)
        board = next((c for c in getattr(handler, "callbacks", []) if isinstance(c, TensorBoardCallback)), None)
        return board.tb_writer if board is not None else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        # Evaluation logs and the closing summary (train_runtime, ...) come with no new samples.
        if not self.rows or not state.is_world_process_zero or any(k.startswith("eval_") for k in logs):
            return
        if "train_runtime" in logs:
            return
        samples = getattr(self.trainer, "_logs", None)
        writer = self._writer()
        if writer is None or not samples or not samples.get("completion"):
            return
        table = completion_table(samples, self.rows)
        writer.add_text("completions", table, state.global_step)
        writer.flush()


def completion_table(samples: dict[str, Any], rows: int) -> str:
    """A Markdown table of `rows` samples spread over the batch (so several prompts show, not one group)."""
    count = len(samples["completion"])
    picked = list(range(0, count, max(1, count // rows)))[:rows]
    sources = list(samples.get("rewards", {}))
    # PPO's advantages are per token, so its samples carry none; GRPO/RLOO's are one per completion.
    advantages = samples.get("advantages")
    header = ["prompt", "response", *sources, *(["advantage"] if advantages is not None else [])]

    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i in picked:
        row = [_text(samples["prompt"][i]), _text(samples["completion"][i])]
        row += [samples["rewards"][name][i] for name in sources]
        if advantages is not None:
            row.append(advantages[i] if i < len(advantages) else "")
        lines.append("| " + " | ".join(cell(value) for value in row) + " |")
    return "\n".join(lines)


def _text(message: Any) -> str:
    """A prompt or completion as text: a string, or the last message's content of a conversation."""
    return message[-1]["content"] if isinstance(message, list) and message else str(message)
