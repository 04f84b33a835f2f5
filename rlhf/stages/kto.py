"""Kahneman-Tversky Optimization with TRL's KTOTrainer: learn from answers labelled good or bad, no pairs needed.

rlhf train recipes/tiny/kto.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.kto recipes/tiny/kto.yaml

The data is unpaired: `prompt`, `completion` and a boolean `label` (true: desirable). Preference
pairs (files, Hub sets, `synthetic:preference`) are split into one desirable and one undesirable
row each by trl's `unpair_preference_dataset`. `desirable_weight`/`undesirable_weight` rebalance
unequal counts. The reference model is a frozen copy of the start, or under `use_peft: true` the
same model with its adapters off; adapters are merged on save. Bad numbers (a NaN/inf loss or
gradient norm, or one above `max_grad_norm_alarm`) stop the run as in DPO.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from trl import KTOConfig, KTOTrainer, get_peft_config

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import DivergenceArguments, stage_callbacks
from rlhf.config import Recipe, RecipeError
from rlhf.data import prepare_datasets
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer, merge_adapters
from rlhf.recipe import parse_recipe


@dataclass
class KTOStageConfig(KTOConfig, DivergenceArguments):
    """KTOConfig plus the gradient-norm alarm."""


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    recipe = parse_recipe(argv, KTOStageConfig, stage="kto", produced=produced)
    training = recipe.training
    # KTO estimates its KL term from the other completions of the same batch: TRL refuses both of these, but
    # only after the model has loaded.
    if training.per_device_train_batch_size < 2:
        raise RecipeError(
            f"per_device_train_batch_size: got {training.per_device_train_batch_size}; KTO estimates its KL term "
            "from the other rows of a batch, so set 2 or more."
        )
    if training.loss_type == "kto" and training.train_sampling_strategy != "sequential":
        raise RecipeError(
            f"train_sampling_strategy: got {training.train_sampling_strategy!r}; loss_type 'kto' pairs each row "
            "with its neighbour in a fixed-order batch, so set 'sequential' (the data is already shuffled), or use "
            "loss_type 'apo_zero_unpaired'."
        )
    return recipe


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "unpaired", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    model = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(model, tokenizer)

    final_dir, resume_from = start_stage(training_args)
    trainer = KTOTrainer(
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
