"""Odds Ratio Preference Optimization with TRL's ORPOTrainer: SFT and preference learning in one loss, no reference.

rlhf train recipes/tiny/orpo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.orpo recipes/tiny/orpo.yaml

The loss is the chosen answer's negative log-likelihood plus `beta` (λ in the paper) times the log
odds ratio of chosen over rejected, so ORPO can start from a base or an SFT model and keeps no
reference copy in memory. The trainer lives in `trl.experimental.orpo` (its API may still change).
LoRA adapters are merged on save; a NaN/inf loss or gradient norm, or one above
`max_grad_norm_alarm`, stops the run before a broken checkpoint is written.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from trl import get_peft_config
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import DivergenceArguments, stage_callbacks
from rlhf.config import Recipe
from rlhf.data import prepare_datasets
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer, merge_adapters
from rlhf.recipe import parse_recipe


@dataclass
class ORPOStageConfig(ORPOConfig, DivergenceArguments):
    """ORPOConfig plus the gradient-norm alarm."""


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    recipe = parse_recipe(argv, ORPOStageConfig, stage="orpo", produced=produced)
    return recipe


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "preference", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    model = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(model, tokenizer)

    final_dir, resume_from = start_stage(training_args)
    trainer = ORPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=stage_callbacks(model_args, training_args),
    )

    eval_before = evaluate_before_training(trainer) if eval_dataset is not None else {}
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    eval_after = trainer.evaluate() if eval_dataset is not None else {}
    merge_adapters(trainer)
    finish_stage(
        trainer,
        recipe,
        {
            "train": train_result.metrics,
            "eval_before": eval_before,
            "eval": eval_after,
            "data": data_report,
            "resumed_from": resume_from,
        },
        final_dir,
    )


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
