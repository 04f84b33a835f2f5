"""Direct Preference Optimization with TRL's DPOTrainer: learn from preference pairs without a reward model.

rlhf train recipes/tiny/dpo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.dpo recipes/tiny/dpo.yaml

The reference model is TRL's default: a frozen copy of the starting checkpoint, or, with
`use_peft: true`, the same model with its adapters disabled (no second copy in memory). LoRA
adapters are merged into the base on save, so the output loads as a plain causal LM. A NaN/inf loss
or gradient norm, or one above `max_grad_norm_alarm`, stops the run before a broken checkpoint is written.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer, get_peft_config

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import DivergenceArguments, stage_callbacks
from rlhf.config import Recipe
from rlhf.data import prepare_datasets
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer, merge_adapters
from rlhf.recipe import parse_recipe
from rlhf.token_checks import check_stop_token_trained, check_tokenizer_fit


@dataclass
class DPOStageConfig(DPOConfig, DivergenceArguments):
    """DPOConfig plus the gradient-norm alarm."""


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    return parse_recipe(argv, DPOStageConfig, stage="dpo", produced=produced)


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "preference", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    data_report["tokenizer_fit"] = check_tokenizer_fit(tokenizer, train_dataset)
    model = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(model, tokenizer)

    final_dir, resume_from = start_stage(training_args)
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=stage_callbacks(model_args, training_args),
    )
    rows = trainer.train_dataset.select(range(min(8, len(trainer.train_dataset))))
    check_stop_token_trained(
        [row[side] for row in rows for side in ("chosen_ids", "rejected_ids")],
        model,
        tokenizer,
        "chosen/rejected completions",
        "end each completion with the EOS (the chat template's end of an assistant turn), or raise max_length if "
        "long completions are cut before it.",
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
