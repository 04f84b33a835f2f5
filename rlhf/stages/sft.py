"""Supervised fine-tuning with TRL's SFTTrainer.

rlhf train recipes/tiny/sft.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.sft recipes/tiny/sft.yaml
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from trl import SFTConfig, SFTTrainer, clone_chat_template, get_peft_config

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import regularization_callbacks
from rlhf.config import Recipe
from rlhf.data import prepare_datasets
from rlhf.data.assistant_mask import tokenize_conversations
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import (
    align_generation_config,
    check_trainable_chat_template,
    load_causal_lm,
    load_tokenizer,
    merge_adapters,
)
from rlhf.recipe import parse_recipe
from rlhf.token_checks import check_stop_token_trained, check_tokenizer_fit


def check_stop_token_in_loss(trainer: SFTTrainer, num_rows: int = 8) -> None:
    """A model that never sees its stop token in the loss never learns to stop: refuse to train so."""
    rows = trainer.train_dataset.select(range(min(num_rows, len(trainer.train_dataset))))
    trained = []
    for row in rows:
        # TRL 1.16 turns assistant/completion masks into labels (-100 = no loss); older layouts keep the masks.
        if "labels" in row:
            mask = [label != -100 for label in row["labels"]]
        else:
            mask = row.get("assistant_masks") or row.get("completion_mask") or [1] * len(row["input_ids"])
        trained.append([token for token, m in zip(row["input_ids"], mask) if m])
    check_stop_token_trained(
        trained,
        trainer.model,
        trainer.processing_class,
        "training rows' loss masks",
        "put the EOS inside the chat template's {% generation %} block, or set `eos_token` to the token that ends "
        "assistant turns.",
    )


def use_chat_template_path(model, tokenizer, training_args: SFTConfig):
    """Apply `chat_template_path` (a .jinja file, or a tokenizer folder whose template and tokens are cloned)."""
    path = training_args.chat_template_path
    if path is None:
        return model, tokenizer
    if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
    else:
        model, tokenizer, _ = clone_chat_template(model, tokenizer, path)
    training_args.chat_template_path = None  # applied once, here
    return model, tokenizer


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    recipe = parse_recipe(argv, SFTConfig, stage="sft", produced=produced)
    if recipe.training.assistant_only_loss and str(Path(recipe.model.model_name_or_path)) not in map(
        str, map(Path, produced)
    ):
        check_trainable_chat_template(recipe.model, recipe.training.chat_template_path, recipe.trust_remote_code)
    return recipe


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "sft", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    data_report["tokenizer_fit"] = check_tokenizer_fit(tokenizer, train_dataset)
    model = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(model, tokenizer)
    if training_args.assistant_only_loss:
        # rlhf masks assistant turns with the checkpoint's own template (any markup); TRL's collator turns
        # the `assistant_masks` column into labels, so TRL's own marker-based masking is switched off.
        model, tokenizer = use_chat_template_path(model, tokenizer, training_args)
        train_dataset = tokenize_conversations(train_dataset, tokenizer)
        eval_dataset = tokenize_conversations(eval_dataset, tokenizer) if eval_dataset is not None else None
        training_args.assistant_only_loss = False

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
    check_stop_token_in_loss(trainer)

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
