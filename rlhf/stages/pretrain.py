"""Causal language-model pretraining, from scratch or continued, on plain text with packing.

TRL's SFTTrainer on a `text` dataset is exactly a causal-LM trainer with packing, so this stage
uses it rather than a second training loop.

    rlhf train recipes/tiny/pretrain.yaml
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from transformers import set_seed
from trl import SFTConfig, SFTTrainer, get_peft_config

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import regularization_callbacks
from rlhf.config import Recipe
from rlhf.data import prepare_datasets
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer, merge_adapters
from rlhf.recipe import parse_recipe
from rlhf.token_checks import check_tokenizer_fit


@dataclass
class PretrainConfig(SFTConfig):
    """SFTConfig plus `from_scratch`: initialise weights from the checkpoint's config instead of loading them."""

    from_scratch: bool = field(default=False, metadata={"help": "Random init from the checkpoint's config."})
    packing: bool = field(default=True, metadata={"help": "Pack texts into full-length blocks (SFTConfig's)."})


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    return parse_recipe(argv, PretrainConfig, stage="pretrain", produced=produced)


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "language_modeling", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    data_report["tokenizer_fit"] = check_tokenizer_fit(tokenizer, train_dataset)
    set_seed(training_args.seed)  # a from-scratch init must be the same in every run with this seed
    model = load_causal_lm(model_args, recipe.trust_remote_code, from_scratch=training_args.from_scratch)
    align_generation_config(model, tokenizer)

    final_dir, resume_from = start_stage(training_args)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=regularization_callbacks(model_args),
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
