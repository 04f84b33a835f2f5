"""What every evaluation section reads: the loaded models, the judge, the held-out prompts and one generation pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from datasets import Dataset
from trl import ModelConfig

from rlhf.config import DataArguments, load_reward_function
from rlhf.data.formats import convert
from rlhf.data.load import load_source
from rlhf.evaluation.generation import generate_tokens
from rlhf.modeling import load_causal_lm, load_sequence_classifier, load_tokenizer
from rlhf.rewards import completions_for, reward_model_scores


@dataclass
class EvalConfig:
    """What `rlhf eval` measures and on which data (the keys of an eval recipe)."""

    sections: list[str] | None = None  # None: every section of rlhf.evaluation.sections.SECTIONS
    prompts_dataset: str = "synthetic:prompts"
    prompts_split: str = "test"
    num_prompts: int = 64
    max_new_tokens: int = 32
    batch_size: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    rule_reward: str | None = "rlhf.data.synthetic:rule_reward"
    reward_model_path: str | None = None
    reference_model_path: str | None = None
    # Who decides each win: "rule" or "reward_model"; "auto" is the reward model when given, else the rule.
    # A rule that scores 0/1 makes ties, which count half; a reward model's scores almost never tie.
    win_rate_judge: str = "auto"
    preference_dataset: str = "synthetic:preference"
    preference_split: str = "test"
    num_preference_pairs: int = 64
    perplexity_dataset: str = "synthetic:pretrain"
    perplexity_split: str = "test"
    num_perplexity_texts: int = 128
    perplexity_max_length: int = 256
    safety_suite: str | None = None
    num_safety_prompts: int | None = None
    robustness_perturbations: list[str] | None = None  # None: every perturbation
    robustness_probability: float = 0.15
    num_report_samples: int = 10
    html: bool = True
    output_dir: str | None = None
    trust_remote_code: bool = False


def mean(values: Sequence[float]) -> float:
    """The mean, 0 for no values."""
    return sum(values) / len(values) if values else 0.0


def load_rows(path: str, split: str, num_rows: int, seed: int, field: str) -> list[dict[str, Any]]:
    """Rows of a dataset source (a local file or folder, a Hub id or `synthetic:<kind>`)."""
    # The synthetic world samples prompts with replacement: draw more, deduplicate later.
    data_args = DataArguments(dataset_name=path, synthetic_num_examples=max(8 * num_rows, 400))
    return load_source({"path": path, "split": split}, data_args, seed, field).to_list()


def load_prompts(config: EvalConfig) -> list[dict[str, Any]]:
    """Unique held-out prompts (rows keep their other columns, e.g. `kind`, `reference`)."""
    rows = load_rows(config.prompts_dataset, config.prompts_split, config.num_prompts, config.seed, "prompts_dataset")
    if "prompt" not in rows[0]:
        rows = convert(Dataset.from_list(rows), "prompt_only", "prompts_dataset").to_list()
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(repr(row["prompt"]), row)
    return list(unique.values())[: config.num_prompts]


class Models:
    """Loads each checkpoint once: the policies under evaluation, the reference and the reward model."""

    def __init__(self, trust_remote_code: bool) -> None:
        self.trust_remote_code = trust_remote_code
        self.cache: dict[tuple[str, str], Any] = {}

    def causal_lm(self, path: str) -> tuple[Any, Any]:
        """(model, tokenizer) of a causal LM checkpoint."""
        if ("lm", path) not in self.cache:
            args = ModelConfig(model_name_or_path=path)
            self.cache[("lm", path)] = (
                load_causal_lm(args, self.trust_remote_code),
                load_tokenizer(args, self.trust_remote_code),
            )
        return self.cache[("lm", path)]

    def reward_model(self, path: str) -> tuple[Any, Any]:
        """(model, tokenizer) of a sequence-classification reward model."""
        if ("rm", path) not in self.cache:
            args = ModelConfig(model_name_or_path=path)
            tokenizer = load_tokenizer(args, self.trust_remote_code)
            self.cache[("rm", path)] = (
                load_sequence_classifier(args, tokenizer, trust_remote_code=self.trust_remote_code),
                tokenizer,
            )
        return self.cache[("rm", path)]


class Judge:
    """Scores (prompt, response) pairs: the reward model when given, else the rule reward function."""

    def __init__(self, config: EvalConfig, models: Models) -> None:
        self.batch_size = config.batch_size
        self.rule = load_reward_function(config.rule_reward, "rule_reward") if config.rule_reward else None
        self.rule_name = config.rule_reward
        self.reward_model = models.reward_model(config.reward_model_path) if config.reward_model_path else None
        # The reward model's pairwise accuracy depends on no checkpoint: the reward_model section fills it once.
        self.pairwise: dict[str, Any] | None = None
        self.name = (
            f"reward model `{config.reward_model_path}`" if self.reward_model else f"rule `{config.rule_reward}`"
        )

    def rule_scores(self, rows: list[dict[str, Any]], responses: list[str]) -> list[float] | None:
        """The rule reward of each response (None without a rule)."""
        if self.rule is None:
            return None
        prompts = [r["prompt"] for r in rows]
        extra = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        return [float(s) for s in self.rule(prompts=prompts, completions=completions_for(prompts, responses), **extra)]

    def model_scores(self, rows: list[dict[str, Any]], responses: list[str]) -> list[float] | None:
        """The reward model's score of each response (None without a reward model)."""
        if self.reward_model is None:
            return None
        model, tokenizer = self.reward_model
        return reward_model_scores(model, tokenizer, [r["prompt"] for r in rows], responses, self.batch_size).tolist()

    def __call__(self, rows: list[dict[str, Any]], responses: list[str]) -> list[float]:
        """The reward model's scores when there is one, else the rule's."""
        scores = self.model_scores(rows, responses)
        return scores if scores is not None else self.rule_scores(rows, responses)  # type: ignore[return-value]

    def win_rate_name(self, judge: str) -> str:
        """The judge of the win-rate, as the report names it."""
        if judge == "rule" or (judge == "auto" and self.reward_model is None):
            return f"rule `{self.rule_name}`"
        return self.name

    def win_rate_scores(self, rows: list[dict[str, Any]], responses: list[str], judge: str) -> list[float]:
        """Scores for the win-rate by `win_rate_judge`: "rule", "reward_model" or "auto" (as `__call__`)."""
        if judge == "auto":
            return self(rows, responses)
        scores = self.rule_scores(rows, responses) if judge == "rule" else self.model_scores(rows, responses)
        return scores  # type: ignore[return-value]  # the runner checks that the judge exists


@dataclass
class Generation:
    """The policy's answers to the held-out prompts and their scores, as several sections read them."""

    pairs: list[tuple[list[int], list[int]]]  # (prompt ids, response ids) per prompt
    responses: list[str]
    rule_scores: list[float] | None
    reward_model_scores: list[float] | None

    @property
    def judge_scores(self) -> list[float]:
        """What the judge gives these responses: the reward model's scores when there is one, else the rule's."""
        scores = self.reward_model_scores if self.reward_model_scores is not None else self.rule_scores
        return scores  # type: ignore[return-value]


@dataclass
class SectionContext:
    """Everything a section reads for one checkpoint; the prompts and their generation are computed on first use."""

    checkpoint: str
    config: EvalConfig
    model: Any
    tokenizer: Any
    models: Models  # shared by all checkpoints: the reference model loads once
    judge: Judge
    plots_dir: Path  # where plots are written (the scratch output folder)
    published_plots_dir: Path  # where they will be once the output is complete

    @property
    def generation_kwargs(self) -> dict[str, Any]:
        """Length, batch and seed of every generation, whichever model generates."""
        return {
            "max_new_tokens": self.config.max_new_tokens,
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
        }

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        """The held-out prompt rows."""
        return load_prompts(self.config)

    @property
    def prompts(self) -> list[Any]:
        """The held-out prompts (plain strings or conversations)."""
        return [r["prompt"] for r in self.rows]

    @cached_property
    def generated(self) -> Generation:
        """The policy's answers (sampled as the config says) with their rule and reward-model scores."""
        pairs = generate_tokens(
            self.model,
            self.tokenizer,
            self.prompts,
            do_sample=self.config.do_sample,
            temperature=self.config.temperature,
            **self.generation_kwargs,
        )
        responses = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
        return Generation(
            pairs,
            responses,
            self.judge.rule_scores(self.rows, responses),
            self.judge.model_scores(self.rows, responses),
        )
