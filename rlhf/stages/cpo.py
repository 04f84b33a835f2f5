"""Contrastive Preference Optimization with TRL's CPOTrainer; SimPO is its `loss_type: simpo`. No reference model.

rlhf train recipes/tiny/simpo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.cpo recipes/tiny/simpo.yaml

CPO (the default `loss_type: sigmoid`) is DPO's loss on the policy's own log-likelihoods, without
a reference, plus `cpo_alpha` times the chosen answer's negative log-likelihood. SimPO
(`loss_type: simpo`) uses length-normalised log-likelihoods with a target margin `simpo_gamma`;
the SimPO paper has no NLL term, so its recipe sets `cpo_alpha: 0` (a positive value gives
CPO-SimPO). `loss_type` also takes hinge, ipo and alphapo. The trainer lives in
`trl.experimental.cpo` (its API may still change). LoRA adapters are merged on save; a NaN/inf
loss or gradient norm, or one above `max_grad_norm_alarm`, stops the run.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from trl import get_peft_config
from trl.experimental.cpo import CPOConfig, CPOTrainer

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import DivergenceArguments, stage_callbacks
from rlhf.config import Recipe
from rlhf.data import prepare_datasets
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer, merge_adapters
from rlhf.recipe import parse_recipe


@dataclass
class CPOStageConfig(CPOConfig, DivergenceArguments):
    """CPOConfig plus the gradient-norm alarm."""


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    recipe = parse_recipe(argv, CPOStageConfig, stage="cpo", produced=produced)
    return recipe


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "preference", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    model = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(model, tokenizer)

    final_dir, resume_from = start_stage(training_args)
    trainer = CPOTrainer(
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
