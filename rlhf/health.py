"""Training-health alarms shared by every stage: one set of rules over the metrics a trainer logs.

The rules read a `HealthPoint` (one logged step's figures under stage-independent names) and keep
the history they need; adapters turn a stage's log into points: `rlhf.callbacks.HealthCallback` for
Trainer-based stages (GRPO, RLOO, online DPO, DPO and its relatives; PPO's trainer calls the same
callbacks). Alarms:

- `kl`: KL to the reference above `max_kl` (as the stage logs it: GRPO/RLOO per token, PPO and
  online DPO per sequence).
- `length_runaway` / `length_collapse`: mean response length above `max_response_length_ratio` ×
  or below `min_response_length_ratio` × the first logged value.
- `entropy_collapse`: per-token entropy below `min_entropy`.
- `reward_hacking`: the optimised reward (a reward model's score) rising while a held-out judge (the
  world's rule, a second reward function) falls `reward_hacking_judge_drop` below where it started.
- `chosen_collapse` (DPO family): the chosen answers' implicit reward below 0 for `health_window`
  logs, their mean lower than over the logs before and below `min_chosen_reward`.
- `margin_runaway` (DPO family): the chosen-rejected reward margin above `max_reward_margin`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from rlhf.config import RecipeError, load_reward_function

ALARMS = (
    "kl",
    "length_runaway",
    "length_collapse",
    "entropy_collapse",
    "reward_hacking",
    "chosen_collapse",
    "margin_runaway",
)

# What to change when an alarm stops a run (the end of its one line).
FIXES = {
    "kl": "raise beta (the KL penalty) or lower learning_rate",
    "length_runaway": "raise beta or lower learning_rate; a length penalty among reward_funcs also helps",
    "length_collapse": "raise beta or lower learning_rate; check the reward sources do not favour empty answers",
    "entropy_collapse": "raise temperature or beta, or lower learning_rate",
    "reward_hacking": "lower the reward model's weight (reward_weights), raise beta or lower learning_rate",
    "chosen_collapse": "add the sft loss term (loss_type: [sigmoid, sft]), raise beta or lower learning_rate",
    "margin_runaway": "raise beta or lower learning_rate",
}


@dataclass
class HealthArguments:
    """Recipe keys of the health alarms; each alarm warns or stops (keeping the last good checkpoint)."""

    health_action: Literal["warn", "stop"] = field(
        default="warn",
        metadata={
            "help": "What a health alarm does: 'warn' (a warning, and an entry in metrics.json's health_events) "
            "or 'stop' (end the run with one line; the last checkpoint before the alarm is kept, nothing is "
            "published)."
        },
    )
    health_actions: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Per-alarm overrides of health_action, e.g. {reward_hacking: stop}; alarms: "
            + ", ".join(ALARMS)
            + "."
        },
    )
    health_window: int = field(
        default=3,
        metadata={"help": "Logged steps averaged by the trend alarms (reward_hacking, chosen_collapse)."},
    )
    max_kl: float | None = field(
        default=None,
        metadata={
            "help": "Health: largest allowed KL to the reference, as the stage logs it (GRPO/RLOO: mean per "
            "token; PPO, online DPO: per sequence); null: off."
        },
    )
    max_response_length_ratio: float | None = field(
        default=4.0,
        metadata={"help": "Health: largest allowed mean response length / the first logged one; null: off."},
    )
    min_response_length_ratio: float | None = field(
        default=0.25,
        metadata={"help": "Health: smallest allowed mean response length / the first logged one; null: off."},
    )
    min_entropy: float | None = field(
        default=None, metadata={"help": "Health: smallest allowed per-token entropy of sampled tokens; null: off."}
    )
    reward_hacking_judge: str | None = field(
        default="auto",
        metadata={
            "help": "Health: the held-out judge of reward hacking: a reward source's name as logged "
            "(rewards/<name>/mean), or package.module:function scored on the sampled completions; 'auto': "
            "with a reward model among the sources, the world's rule (rlhf.data.synthetic:rule_reward) on "
            "synthetic prompts; null: off."
        },
    )
    reward_hacking_judge_drop: float = field(
        default=0.1,
        metadata={
            "help": "Health: reward hacking is the judge's mean over the last health_window logs falling this "
            "far below its mean over the first health_window logs while the optimised reward-model score rises."
        },
    )
    min_chosen_reward: float | None = field(
        default=-1.0,
        metadata={
            "help": "Health (DPO family): chosen_collapse fires when rewards/chosen stayed below 0 for "
            "health_window logs, their mean fell from the health_window logs before and is below this; null: off."
        },
    )
    max_reward_margin: float | None = field(
        default=None,
        metadata={"help": "Health (DPO family): largest allowed rewards/margins; null: off."},
    )
    completions_table_rows: int = field(
        default=8,
        metadata={
            "help": "Online stages with report_to tensorboard: sampled completions (prompt, response, each "
            "reward source's score) written as a text table every logging_steps; 0: none."
        },
    )

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Run `check_health_arguments` after the config's own `__post_init__`, so bad keys fail at parse time.

        A stage config is e.g. `GRPOConfig + ... + HealthArguments`; TrainingArguments.__post_init__ does not
        call super(), so a `__post_init__` of this mixin would never run. Wrapping the one the subclass
        resolves to keeps the check with the keys, whichever stage mixes them in.
        """
        super().__init_subclass__(**kwargs)
        inherited = getattr(cls, "__post_init__", None)
        if getattr(inherited, "checks_health", False):
            return

        def __post_init__(self: HealthArguments) -> None:
            if inherited is not None:
                inherited(self)
            check_health_arguments(self)

        __post_init__.checks_health = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]


def check_health_arguments(args: HealthArguments) -> None:
    """A RecipeError naming the key and the fix for a health setting that cannot work."""
    for name, action in (args.health_actions or {}).items():
        if name not in ALARMS:
            raise RecipeError(f"health_actions: no alarm named {name!r}; the alarms are {', '.join(ALARMS)}.")
        if action not in ("warn", "stop"):
            raise RecipeError(f"health_actions: {name}: got {action!r}; use 'warn' or 'stop'.")
    if args.health_window < 1:
        raise RecipeError(f"health_window: got {args.health_window}; use 1 or more logged steps.")
    if args.completions_table_rows < 0:
        raise RecipeError(f"completions_table_rows: got {args.completions_table_rows}; use 0 (off) or more.")
    for key in ("max_kl", "max_response_length_ratio", "min_response_length_ratio", "max_reward_margin"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise RecipeError(f"{key}: got {value}; use a positive number, or null to turn the alarm off.")
    if args.max_kl is not None and hasattr(args, "num_generations") and getattr(args, "beta", None) == 0:
        # GRPO/RLOO load no reference model at beta 0, so they log no KL and the alarm could never fire.
        raise RecipeError(
            f"max_kl: {args.max_kl} needs beta > 0 (at beta 0 TRL computes no KL to watch); set a small beta "
            "(e.g. 0.001, a negligible penalty) or remove max_kl."
        )
    if args.reward_hacking_judge and ":" in args.reward_hacking_judge:
        load_reward_function(args.reward_hacking_judge, "reward_hacking_judge")  # a bad path fails at parse time
    if args.reward_hacking_judge_drop <= 0:
        raise RecipeError(f"reward_hacking_judge_drop: got {args.reward_hacking_judge_drop}; use a positive number.")


@dataclass
class HealthPoint:
    """One logged step's figures under stage-independent names (None: the stage does not log it)."""

    step: int
    kl: float | None = None
    length: float | None = None
    entropy: float | None = None
    proxy: float | None = None  # the optimised reward the judge checks (a reward model's score)
    judge: float | None = None  # the held-out judge's score of the same samples
    chosen: float | None = None
    margin: float | None = None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class HealthRules:
    """The alarm rules; `check` takes the next logged point and returns the alarms it raises, as (name, message)."""

    max_kl: float | None = None
    max_response_length_ratio: float | None = None
    min_response_length_ratio: float | None = None
    min_entropy: float | None = None
    reward_hacking_judge_drop: float | None = None
    min_chosen_reward: float | None = None
    max_reward_margin: float | None = None
    window: int = 3
    initial_length: float | None = None
    history: list[HealthPoint] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: object) -> HealthRules:
        """The rules a recipe's health keys ask for (keys a config lacks leave their alarm off)."""
        return cls(
            max_kl=getattr(args, "max_kl", None),
            max_response_length_ratio=getattr(args, "max_response_length_ratio", None),
            min_response_length_ratio=getattr(args, "min_response_length_ratio", None),
            min_entropy=getattr(args, "min_entropy", None),
            reward_hacking_judge_drop=(
                getattr(args, "reward_hacking_judge_drop", None)
                if getattr(args, "reward_hacking_judge", None)
                else None
            ),
            min_chosen_reward=getattr(args, "min_chosen_reward", None),
            max_reward_margin=getattr(args, "max_reward_margin", None),
            window=getattr(args, "health_window", 3),
        )

    def check(self, point: HealthPoint) -> list[tuple[str, str]]:
        """The alarms raised by this logged point, given the ones before it."""
        self.history.append(point)
        alarms = []
        if self.max_kl is not None and point.kl is not None and point.kl > self.max_kl:
            alarms.append(("kl", f"KL to the reference {point.kl:.3f} > max_kl {self.max_kl:g}"))
        alarms += self._length(point)
        if self.min_entropy is not None and point.entropy is not None and point.entropy < self.min_entropy:
            alarms.append(
                ("entropy_collapse", f"per-token entropy {point.entropy:.3f} < min_entropy {self.min_entropy:g}")
            )
        alarms += self._reward_hacking()
        alarms += self._chosen_collapse()
        if self.max_reward_margin is not None and point.margin is not None and point.margin > self.max_reward_margin:
            alarms.append(
                ("margin_runaway", f"reward margin {point.margin:.3f} > max_reward_margin {self.max_reward_margin:g}")
            )
        return alarms

    def _length(self, point: HealthPoint) -> list[tuple[str, str]]:
        if point.length is None:
            return []
        if self.initial_length is None:
            self.initial_length = max(point.length, 1.0)
            return []
        ratio = point.length / self.initial_length
        if self.max_response_length_ratio is not None and ratio > self.max_response_length_ratio:
            return [
                (
                    "length_runaway",
                    f"mean response length {point.length:.1f} is {ratio:.2f}× the first logged "
                    f"({self.initial_length:.1f}; > max_response_length_ratio {self.max_response_length_ratio:g})",
                )
            ]
        if self.min_response_length_ratio is not None and ratio < self.min_response_length_ratio:
            return [
                (
                    "length_collapse",
                    f"mean response length {point.length:.1f} is {ratio:.2f}× the first logged "
                    f"({self.initial_length:.1f}; < min_response_length_ratio {self.min_response_length_ratio:g})",
                )
            ]
        return []

    def _reward_hacking(self) -> list[tuple[str, str]]:
        """Over the last `window` logs the judge's mean is `reward_hacking_judge_drop` below its mean over the first
        `window` logs, while the proxy's mean is above its own start.

        Window means against the start, not single logs or the best window: one log's mean over a few dozen
        samples is noisy, and the best of many noisy windows sits above the truth, so it would raise false alarms.
        """
        if self.reward_hacking_judge_drop is None:
            return []
        pairs = [(p.proxy, p.judge) for p in self.history if p.proxy is not None and p.judge is not None]
        if len(pairs) < 2 * self.window:
            return []
        start, now = pairs[: self.window], pairs[-self.window :]
        proxy_start, proxy_now = _mean([p for p, _ in start]), _mean([p for p, _ in now])
        judge_start, judge_now = _mean([j for _, j in start]), _mean([j for _, j in now])
        if judge_start - judge_now >= self.reward_hacking_judge_drop and proxy_now > proxy_start:
            return [
                (
                    "reward_hacking",
                    f"the optimised reward-model score rose {proxy_start:.3f} → {proxy_now:.3f} while the held-out "
                    f"judge fell {judge_start:.3f} → {judge_now:.3f} (means over the first and the last {self.window} "
                    f"logs; drop ≥ reward_hacking_judge_drop {self.reward_hacking_judge_drop:g})",
                )
            ]
        return []

    def _chosen_collapse(self) -> list[tuple[str, str]]:
        """rewards/chosen below 0 over the last `window` logs, their mean lower than the `window` logs before and
        below `min_chosen_reward`: the policy wins on margin by pushing the preferred answers down too.

        Whole windows, not single logs: one batch's chosen reward is noisy.
        """
        if self.min_chosen_reward is None:
            return []
        chosen = [p.chosen for p in self.history if p.chosen is not None]
        if len(chosen) < 2 * self.window:
            return []
        before, now = _mean(chosen[-2 * self.window : -self.window]), _mean(chosen[-self.window :])
        if all(value < 0 for value in chosen[-self.window :]) and now < before and now < self.min_chosen_reward:
            return [
                (
                    "chosen_collapse",
                    f"the chosen answers' reward keeps falling below 0: {before:.3f} → {now:.3f} (means over "
                    f"{self.window} logs; < min_chosen_reward {self.min_chosen_reward:g})",
                )
            ]
        return []

    def state_dict(self) -> dict[str, object]:
        """What a checkpoint keeps (JSON): the first logged length and the logged points the trend alarms compare."""
        return {"initial_length": self.initial_length, "history": [asdict(point) for point in self.history]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.initial_length = state.get("initial_length")  # type: ignore[assignment]
        self.history = [HealthPoint(**point) for point in state.get("history") or []]  # type: ignore[union-attr]
