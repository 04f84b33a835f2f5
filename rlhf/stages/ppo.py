"""PPO against a reward model and/or Python reward functions, with rlhf.ppo.PPOTrainer (TRL 1.13+ has none).

rlhf train recipes/tiny/ppo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.ppo recipes/tiny/ppo.yaml
accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 8 -m rlhf.stages.ppo RECIPE

Under FSDP2 all four models are sharded (the reference and reward model as inference-only modules);
each rollout gathers the policy and value model whole (rlhf.ppo.trainer). Not under ZeRO-3 or with
LoRA under FSDP: both are refused before any model loads.

The value model (`choose_value_model`, said once at start and recorded in metrics.json): the
`value_model_path` checkpoint; `shared`, a value head on the policy's own backbone (with LoRA, one
base copy serves policy, reference and critic); unset, `shared` for a LoRA policy, else the reward model
when it is a causal LM with the policy's tokenizer, else a new value head on the policy checkpoint. The
output is the policy alone.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection
from pathlib import Path

from transformers import AutoConfig, PreTrainedTokenizerBase, set_seed
from trl import get_peft_config

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import health_callbacks, regularization_callbacks
from rlhf.config import ModelArguments, Recipe, RecipeError
from rlhf.data import prepare_datasets
from rlhf.data.load import sources
from rlhf.data.synthetic import rule_reward
from rlhf.modeling import (
    adapter_base,
    align_generation_config,
    check_model_source,
    is_adapter_dir,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
)
from rlhf.ppo import PPOConfig, PPOTrainer
from rlhf.ppo.models import SHARED, ValueHead
from rlhf.recipe import parse_recipe
from rlhf.rewards import RewardModelRecord, is_encoder, resolve_reward_sources, reward_model_record

logger = logging.getLogger(__name__)


def sibling_model_args(model_args: ModelArguments, path: str) -> ModelArguments:
    """Model arguments for another checkpoint (reward/value model): the policy's dtype, attention and pickle consent."""
    return ModelArguments(
        model_name_or_path=path,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        allow_pickle_weights=model_args.allow_pickle_weights,
    )


def same_vocabulary(tokenizer: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map the same tokens to the same ids (a value model reads the policy's token ids)."""
    return tokenizer.get_vocab() == other.get_vocab()


def choose_value_model(
    args: PPOConfig,
    model_args: ModelArguments,
    policy_tokenizer: PreTrainedTokenizerBase,
    reward_tokenizer: PreTrainedTokenizerBase | None,
    trust_remote_code: bool = False,
) -> tuple[str, str]:
    """The checkpoint the value model starts from, and why; a RecipeError, before any model loads, for one it
    cannot be.

    The value model scores every token of the policy's own token ids, left to right. So it must share the
    policy's vocabulary and be causal: an encoder's bidirectional attention would let its value of a token
    see the tokens after it. Unset, it is a `ValueHead` on a LoRA policy itself, else the reward model when
    that qualifies (it already reads responses), else a new value head on the policy checkpoint. `shared`: a
    `ValueHead` on the policy itself.
    """
    if args.value_model_path == SHARED:
        return SHARED, "a value head on the policy's last hidden state: one backbone for policy and critic"
    if not args.value_model_path and model_args.use_peft:
        # Measured (benchmarks/README.md): 1.8x the episodes/s of a full critic at 135M, half the memory, and a
        # reward gain at least as large on the tiny world (3 seeds).
        return SHARED, (
            "a value head on the LoRA policy's own backbone, the default with LoRA: one base copy for policy, "
            "reference and critic; set value_model_path to a checkpoint for a separate critic"
        )
    if args.value_model_path:
        path = args.value_model_path
        tokenizer = load_tokenizer(sibling_model_args(model_args, path), trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        differs = not same_vocabulary(tokenizer, policy_tokenizer)
        if is_encoder(config):
            why = (
                "its tokenizer differs from the policy's, so it would read the policy's token ids as its own"
                if differs
                else "its attention is bidirectional, so its value of a token would see the tokens after it"
            )
            raise RecipeError(
                f"value_model_path: {path} is an encoder ({config.model_type}) and {why}; leave value_model_path "
                "unset (a value head on the policy checkpoint), or give a causal LM checkpoint with the policy's "
                "tokenizer."
            )
        if differs:
            raise RecipeError(
                f"value_model_path: the tokenizer of {path} differs from the policy's ({model_args.model_name_or_path}), "
                "and the value model reads the policy's token ids; give a checkpoint with the policy's tokenizer, or "
                "leave value_model_path unset (a value head on the policy checkpoint)."
            )
        return path, "set by value_model_path"
    policy_path = model_args.model_name_or_path
    if is_adapter_dir(policy_path) and not (Path(policy_path) / "config.json").exists():
        # An adapter folder has no full weights of its own to put a score head on: the critic starts from its base.
        policy_path = adapter_base(policy_path)
    if not args.reward_model_path:
        return policy_path, "a new value head on the policy checkpoint (no reward model to start from)"
    reward_config = AutoConfig.from_pretrained(args.reward_model_path, trust_remote_code=trust_remote_code)
    if is_encoder(reward_config):
        return policy_path, (
            f"a new value head on the policy checkpoint: the reward model is an encoder ({reward_config.model_type}), "
            "which cannot score the policy's tokens one by one"
        )
    if reward_tokenizer is None or not same_vocabulary(reward_tokenizer, policy_tokenizer):
        return policy_path, (
            "a new value head on the policy checkpoint: the reward model's tokenizer differs from the policy's"
        )
    return args.reward_model_path, "the reward model, which shares the policy's tokenizer"


def launched_with_zero3() -> bool:
    """Whether `accelerate launch` runs this process under DeepSpeed ZeRO-3: `zero_stage: 3` in the accelerate config,
    or stage 3 in the DeepSpeed JSON it names (`deepspeed_config_file`, as accelerate_configs/zero3_cpu.yaml does;
    accelerate then sets no ACCELERATE_DEEPSPEED_ZERO_STAGE and takes the stage from the file)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":
        from accelerate.utils.deepspeed import HfDeepSpeedConfig

        return HfDeepSpeedConfig(config_file).is_zero3()
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    # Refused before anything is built (TrainingArguments would set up DeepSpeed), not by a hang at generation.
    if launched_with_zero3():
        raise RecipeError(
            "ppo: PPO does not run under DeepSpeed ZeRO-3 (generation needs the gathered weights); launch it with "
            "accelerate_configs/fsdp.yaml (FSDP2 shards all four models) or ddp.yaml."
        )
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise RecipeError(
            "ppo: PPO runs sharded under FSDP2 only; set fsdp_version: 2 in the accelerate config's fsdp_config "
            "(as accelerate_configs/fsdp.yaml does)."
        )
    recipe = parse_recipe(argv, PPOConfig, stage="ppo", produced=produced)
    if fsdp and recipe.model.use_peft:
        raise RecipeError(
            "use_peft: LoRA PPO does not run under FSDP (its point is one base copy that fits one device); launch "
            "it with accelerate_configs/ddp.yaml, or set use_peft: false to shard the full model."
        )
    return recipe


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, args = recipe.model, recipe.data, recipe.training

    # Every reward source is checked (and the reward model's quality gated) before any model loads.
    reward_sources = resolve_reward_sources(args, allow_pickle=model_args.allow_pickle_weights)
    reward_funcs = [source for source in reward_sources if callable(source)]
    record = reward_model_record(args.reward_model_path) if args.reward_model_path else RewardModelRecord()
    if args.reward_model_path and args.normalize_reward and record.stats is None:
        logger.warning(
            "reward_model_path %s has no reward_stats (no metrics.json from the reward stage): PPO uses its raw "
            "scores, unnormalised.",
            args.reward_model_path,
        )
    if args.value_model_path and args.value_model_path != SHARED:
        args.value_model_path = check_model_source(
            args.value_model_path, "value_model_path", allow_pickle=model_args.allow_pickle_weights
        )

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "prompt_only", args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    reward_args = sibling_model_args(model_args, args.reward_model_path) if args.reward_model_path else None
    reward_tokenizer = load_tokenizer(reward_args, recipe.trust_remote_code) if reward_args else None
    value_path, value_reason = choose_value_model(
        args, model_args, tokenizer, reward_tokenizer, recipe.trust_remote_code
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"PPO value model: {value_path} ({value_reason})", file=sys.stderr)

    policy = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(policy, tokenizer)
    reward_model = None
    if reward_args:
        reward_model = load_sequence_classifier(
            reward_args, reward_tokenizer, trust_remote_code=recipe.trust_remote_code
        )
    # A new value head is drawn at load time: seeded, so a rerun (or a resume) starts from the same head.
    set_seed(args.seed)
    if value_path == SHARED:
        value_model = ValueHead.for_policy(policy)
    else:
        value_model = load_sequence_classifier(
            sibling_model_args(model_args, value_path), tokenizer, trust_remote_code=recipe.trust_remote_code
        )

    final_dir, resume_from = start_stage(args)
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # a frozen copy of the policy, or the policy with adapters disabled under LoRA
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        eval_dataset=eval_dataset,
        reward_funcs=reward_funcs,
        reward_processing_class=reward_tokenizer,
        reward_stats=record.stats,
        peft_config=get_peft_config(model_args),
        # Bad numbers are checked in PPO's own loop; the health alarms and the completions table as in every stage.
        callbacks=[*regularization_callbacks(model_args), *health_callbacks(args)],
    )
    extra = {}
    if all(entry["path"].startswith("synthetic:") for entry in sources(data_args)):
        extra["rule_score"] = rule_reward
    eval_before = trainer.evaluate(metric_key_prefix="eval_before", extra_reward_funcs=extra)
    train_metrics = trainer.train(resume_from_checkpoint=resume_from)
    eval_after = trainer.evaluate(extra_reward_funcs=extra)
    finish_stage(
        trainer,
        recipe,
        {
            "train": train_metrics,
            "eval_before": eval_before,
            "eval": eval_after,
            "reward_checks": trainer.reward_checks,
            "reward_model_accuracy": record.accuracy,
            "reward_stats": record.stats,
            "value_model": {"path": value_path, "reason": value_reason},
            "data": data_report,
            "resumed_from": resume_from,
        },
        final_dir,
    )


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
