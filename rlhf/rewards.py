"""Reward sources and the one scorer shared by the reward stage, PPO, GRPO/RLOO and evaluation.

- Reward sources of a recipe: Python functions by import path and/or a reward model, checked
  before any model loads (`resolve_reward_sources`, `check_reward_weights`).
- Bad reward values: `RewardGuard` applies the recipe's `nonfinite_rewards` and `max_abs_reward` to
  each source's values in PPO, GRPO and RLOO alike.
- A reward model's record: what the reward stage wrote to its metrics.json (`reward_model_record`)
  and the quality gate on it (`check_reward_quality`).
- Scoring: `reward_model_inputs` is the one rule for how a reward model reads (prompt, completion):
  a causal-LM-based one exactly as TRL's RewardTrainer tokenises (`reward_model_input_ids`), an
  encoder (`is_encoder`) by its native pair encoding. The reward stage trains on it; PPO, GRPO/RLOO
  (`reward_model_function`) and evaluation score through `reward_model_scores`, and `score_inputs`
  reads the score the way the model's own forward pools (last non-pad token; an encoder's [CLS]).

Log-probabilities of responses and KL to a reference are `rlhf.logprobs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from rlhf.artifacts import METRICS_FILE, read_metrics
from rlhf.callbacks import TrainingStopped
from rlhf.config import RecipeError, load_reward_function
from rlhf.modeling import check_model_source, is_encoder

logger = logging.getLogger(__name__)

RULE_REWARD = "rlhf.data.synthetic:rule_reward"

# ---------------------------------------------------------------------------------------------
# Reward sources of a recipe.
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardSourceArguments:
    """Recipe keys naming the rewards of an online RL stage (PPO, GRPO, RLOO).

    `reward_model_path` is a reward model directory (the reward stage's output) or Hub id;
    `reward_funcs` lists Python reward functions as `package.module:function`. With several
    sources, their order (reward model first) is the order of TRL's `reward_weights`.
    `nonfinite_rewards` and `max_abs_reward` say what happens to a source's NaN, ±inf or huge values.
    """

    reward_model_path: str | None = None
    reward_funcs: list[str] | None = None
    reward_min_accuracy: float = 0.9
    nonfinite_rewards: Literal["stop", "skip"] = field(
        default="stop",
        metadata={
            "help": "A reward source returns NaN or ±inf: 'stop' ends the run with one line naming the source, step "
            "and value (nothing is published); 'skip' leaves those samples out of the update and counts them."
        },
    )
    max_abs_reward: float | None = field(
        default=1e4,
        metadata={
            "help": "A finite reward beyond ±max_abs_reward is clipped to it, with one warning per source; null "
            "turns clipping off."
        },
    )


def check_reward_weights(weights: list[float] | None, num_sources: int) -> list[float]:
    """The weight of each reward source (1.0 each when unset); one weight per source or a RecipeError."""
    if weights is None:
        return [1.0] * num_sources
    if len(weights) != num_sources:
        raise RecipeError(
            f"reward_weights: {len(weights)} weights for {num_sources} reward sources (reward model first, then "
            "reward_funcs in order); give one weight per source."
        )
    return list(weights)


def resolve_reward_sources(
    args: RewardSourceArguments, allow_pickle: bool = False
) -> list[str | Callable[..., list[float]]]:
    """Check and resolve a recipe's reward sources into TRL's `reward_funcs` list, before any model loads.

    A reward model stays a path string (TRL loads it with AutoModelForSequenceClassification); its
    held-out accuracy must reach `reward_min_accuracy` (0 disables the check). `allow_pickle` is the
    recipe's `allow_pickle_weights`.
    """
    if args.max_abs_reward is not None and not args.max_abs_reward > 0:
        raise RecipeError(f"max_abs_reward: got {args.max_abs_reward}; give a positive bound, or null for none.")
    sources: list[str | Callable[..., list[float]]] = []
    if args.reward_model_path:
        args.reward_model_path = check_model_source(args.reward_model_path, "reward_model_path", allow_pickle)
        check_reward_quality(args.reward_model_path, args.reward_min_accuracy)
        sources.append(args.reward_model_path)
    sources.extend(load_reward_function(spec) for spec in args.reward_funcs or [])
    if not sources:
        raise RecipeError(
            f"reward_funcs: no reward source; set `reward_model_path` (a reward stage output) and/or "
            f"`reward_funcs: [{RULE_REWARD}]`."
        )
    check_reward_weights(getattr(args, "reward_weights", None), len(sources))
    return sources


def reward_source_name(source: str | Callable[..., Any]) -> str:
    """How messages and metrics name a reward source: a reward model's path, a function's import path."""
    if isinstance(source, str):
        return source
    return f"{getattr(source, '__module__', '?')}:{getattr(source, '__qualname__', repr(source))}"


class RewardGuard:
    """The recipe's rule for bad reward values, applied to every source's values of a batch at once.

    None from a reward function means "no reward for this sample" (TRL's meaning: it adds 0) and
    passes. NaN and ±inf are non-finite: `nonfinite_rewards: stop` raises one line naming the source,
    the step and the value; `skip` marks the sample skipped (PPO masks it out of advantages and
    losses, GRPO/RLOO give it TRL's treatment of a sample no source could score). A finite value
    beyond ±`max_abs_reward` is clipped to the bound, with one warning per source. Callers hand in
    the whole batch of every process, so each process takes the same decision.
    """

    def __init__(
        self, source_names: list[str], nonfinite_rewards: str = "stop", max_abs_reward: float | None = 1e4
    ) -> None:
        self.source_names, self.action, self.bound = list(source_names), nonfinite_rewards, max_abs_reward
        self.skipped_samples = 0
        self.nonfinite = dict.fromkeys(self.source_names, 0)
        self.clipped = dict.fromkeys(self.source_names, 0)
        self._warned: set[str] = set()

    def check(
        self, values: torch.Tensor, missing: torch.Tensor, where: str, record: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples × sources) values and where a source gave None → (values clipped, NaN where not finite; skipped).

        `skipped` marks each sample with a non-finite value from any source; `where` (e.g. "update 3")
        goes into messages; `record` adds the batch to the counts of `summary` (training, not evaluation).
        """
        nonfinite = ~torch.isfinite(values) & ~missing.bool()
        if nonfinite.any() and self.action == "stop":
            sample, source = (int(i) for i in nonfinite.nonzero()[0])
            raise TrainingStopped(
                f"reward source {self.source_names[source]} returned {values[sample, source].item()} at {where} "
                f"({int(nonfinite[:, source].sum())} of {len(values)} samples); fix it, or set "
                "`nonfinite_rewards: skip` to leave such samples out of the update."
            )
        huge = torch.zeros_like(nonfinite)
        if self.bound is not None:
            huge = torch.isfinite(values) & (values.abs() > self.bound)
            for index, name in enumerate(self.source_names):
                if huge[:, index].any() and name not in self._warned:
                    self._warned.add(name)
                    logger.warning(
                        "reward source %s returned %g at %s; rewards beyond ±max_abs_reward (%g) are clipped to it "
                        "(said once per source; metrics.json counts them under reward_checks).",
                        name,
                        values[:, index][huge[:, index]][0].item(),
                        where,
                        self.bound,
                    )
            values = values.clamp(-self.bound, self.bound)  # NaN stays NaN
        skipped = nonfinite.any(1)
        if record:
            self.skipped_samples += int(skipped.sum())
            for index, name in enumerate(self.source_names):
                self.nonfinite[name] += int(nonfinite[:, index].sum())
                self.clipped[name] += int(huge[:, index].sum())
        return values.masked_fill(nonfinite, float("nan")), skipped

    def summary(self) -> dict[str, Any]:
        """What metrics.json records: the settings, samples skipped, and non-finite and clipped values per source."""
        return {
            "nonfinite_rewards": self.action,
            "max_abs_reward": self.bound,
            "skipped_samples": self.skipped_samples,
            "nonfinite": self.nonfinite,
            "clipped": self.clipped,
        }


# ---------------------------------------------------------------------------------------------
# What the reward stage recorded about a reward model.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardModelRecord:
    """A reward model's held-out accuracy and score statistics, as the reward stage wrote them to metrics.json.

    Both are None for a model the reward stage did not write (a Hub model, any plain sequence classifier).
    """

    accuracy: float | None = None
    stats: dict[str, float] | None = None  # {"mean", "std"} of its scores, used to standardise rewards


def reward_model_record(reward_model_path: str) -> RewardModelRecord:
    """Read a reward model's metrics.json once; an empty record when it has none."""
    if not (Path(reward_model_path) / METRICS_FILE).is_file():
        return RewardModelRecord()
    metrics = read_metrics(reward_model_path)
    stats = metrics.get("reward_stats")
    accuracy = metrics.get("accuracy")
    return RewardModelRecord(
        accuracy=None if accuracy is None else float(accuracy),
        stats=stats if stats and {"mean", "std"} <= set(stats) else None,
    )


def check_reward_quality(reward_model_path: str, min_accuracy: float) -> float:
    """Refuse a reward model whose held-out pairwise accuracy is below `min_accuracy`; return the accuracy.

    A `min_accuracy` of 0 or less disables the check (and returns NaN when the model has no recorded
    accuracy, e.g. a Hub reward model).
    """
    accuracy = reward_model_record(reward_model_path).accuracy
    if min_accuracy <= 0:
        return float("nan") if accuracy is None else accuracy
    if accuracy is None:
        raise RecipeError(
            f"reward_min_accuracy: {reward_model_path!r} has no held-out accuracy in {METRICS_FILE} (it was not "
            "written by the reward stage with an eval set); train it with `rlhf train <reward recipe>`, or set "
            "`reward_min_accuracy: 0` to use it unchecked."
        )
    if math.isnan(accuracy) or accuracy < min_accuracy:
        raise RecipeError(
            f"reward model accuracy {accuracy:.2f} < min {min_accuracy:.2f} (held-out pairwise accuracy of "
            f"{reward_model_path}); a policy trained on it would learn its mistakes. Retrain it (more steps or data, "
            "another learning rate) or lower `reward_min_accuracy`."
        )
    return accuracy


# ---------------------------------------------------------------------------------------------
# Reward-model scores.
# ---------------------------------------------------------------------------------------------


def completions_for(prompts: list[Any], responses: list[str]) -> list[Any]:
    """Responses in TRL's completion layout: assistant messages for conversational prompts, else strings."""
    return [[{"role": "assistant", "content": r}] if isinstance(p, list) else r for p, r in zip(prompts, responses)]


def completion_text(completion: Any) -> str:
    """The text of a completion in TRL's layout: a string, or the content of its (assistant) messages."""
    if isinstance(completion, list):
        return "\n".join(message["content"] for message in completion)
    return completion


def encoder_prompt_text(prompt: Any) -> str:
    """A prompt as the first text of an encoder's pair: a plain prompt as is, a one-message conversation its
    content, a longer one `role: content` lines (an encoder has no chat template to mark the turns)."""
    if not isinstance(prompt, list):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{message['role']}: {message['content']}" for message in prompt)


def encoder_max_length(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The longest input an encoder reads: its position table, or the tokenizer's limit when that is smaller."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]  # unset: a huge int
    return min(limits) if limits else None


def reward_model_inputs(
    tokenizer: PreTrainedTokenizerBase, config: PreTrainedConfig, prompt: Any, completion: Any
) -> dict[str, list[int]]:
    """The one rule for how a reward model (of `config`) reads (prompt, completion): what the reward stage
    trains on and what PPO, GRPO/RLOO and evaluation score.

    - A causal-LM-based reward model: `reward_model_input_ids`, exactly as TRL's RewardTrainer tokenises.
    - An encoder (`is_encoder`): its native pair encoding, `tokenizer(prompt text, completion text)`
      (`[CLS] prompt [SEP] completion [SEP]` for BERT), truncated (longest side first) to what its position
      table holds. Token type ids come along when the model has segment embeddings (`type_vocab_size` > 1).
    """
    text = completion_text(completion)
    if not is_encoder(config):
        return {"input_ids": reward_model_input_ids(tokenizer, prompt, text)}
    max_length = encoder_max_length(config, tokenizer)
    encoding = tokenizer(
        encoder_prompt_text(prompt), text, truncation="longest_first" if max_length else False, max_length=max_length
    )
    inputs = {"input_ids": list(encoding["input_ids"])}
    if getattr(config, "type_vocab_size", 0) > 1 and "token_type_ids" in encoding:
        inputs["token_type_ids"] = list(encoding["token_type_ids"])
    return inputs


def reward_model_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: str) -> list[int]:
    """Token ids of (prompt, completion) as TRL's RewardTrainer tokenises a chosen/rejected example.

    Conversational: the chat template over prompt + the assistant message. Plain text: prompt +
    completion + EOS (RewardTrainer appends it when missing), with the tokenizer's special tokens.
    """
    if isinstance(prompt, list):
        messages = [*prompt, {"role": "assistant", "content": completion}]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    text = prompt + completion
    eos = tokenizer.eos_token
    if eos is not None and not text.endswith(eos):
        text += eos
    return list(tokenizer(text=text)["input_ids"])


@torch.no_grad()
def score_inputs(
    model: PreTrainedModel, inputs: list[dict[str, list[int]]], pad_token_id: int, batch_size: int = 32
) -> torch.Tensor:
    """The reward model's scalar score of each encoded input (`reward_model_inputs`), on the CPU.

    Right-padded, as RewardTrainer's collator pads; the model's own forward picks the scored token
    (the last non-pad one for a decoder, the pooled first token, [CLS], for an encoder).
    """
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        batch = {
            key: pad(
                [torch.tensor(row[key], dtype=torch.long) for row in chunk],
                padding_value=pad_token_id if key == "input_ids" else 0,
            ).to(model.device)
            for key in chunk[0]
        }
        batch["attention_mask"] = pad(
            [torch.ones(len(row["input_ids"]), dtype=torch.long) for row in chunk], padding_value=0
        ).to(model.device)
        scores.append(model(**batch).logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.empty(0)


def score_token_ids(
    model: PreTrainedModel, sequences: list[list[int]], pad_token_id: int, batch_size: int = 32
) -> torch.Tensor:
    """`score_inputs` of plain token id sequences (no token type ids)."""
    return score_inputs(model, [{"input_ids": list(ids)} for ids in sequences], pad_token_id, batch_size)


def reward_model_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    completions: list[Any],
    batch_size: int = 32,
) -> torch.Tensor:
    """Scores of completions (texts, or TRL's message lists) after their prompts, encoded as in reward training."""
    inputs = [reward_model_inputs(tokenizer, model.config, p, c) for p, c in zip(prompts, completions)]
    return score_inputs(model, inputs, tokenizer.pad_token_id, batch_size)


def reward_model_function(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, batch_size: int = 32
) -> Callable[..., list[float]]:
    """A reward model as a TRL reward function (prompts, completions, **kw), scoring through `reward_model_scores`.

    For GRPO/RLOO with an encoder reward model: TRL would score it on a chat-template text, not the
    pair encoding it was trained on. `name` becomes the function's `__name__`, which TRL's log keys use.
    """

    def score(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return reward_model_scores(model, tokenizer, prompts, completions, batch_size).tolist()

    score.__name__ = score.__qualname__ = name
    return score
