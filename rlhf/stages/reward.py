"""Reward modeling with TRL's RewardTrainer: a scalar score head on the SFT model (or any encoder).

rlhf train recipes/tiny/reward.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.reward recipes/tiny/reward.yaml

The base is loaded with AutoModelForSequenceClassification (num_labels=1): a causal LM gets a new
`score` head (e.g. LlamaForSequenceClassification), a BERT-style encoder its classifier. Inputs follow
`rlhf.rewards.reward_model_inputs`: TRL tokenises a causal LM's pairs itself (chat template, or
prompt + response + EOS); an encoder's are pair-encoded here, `[CLS] prompt [SEP] response [SEP]`
(with segment ids where the model has them), and handed to RewardTrainer already tokenised. With
`use_peft: true` the LoRA adapters are trained together with the full score head, and merged into
the base on save, so the output loads as a plain AutoModelForSequenceClassification checkpoint.

metrics.json holds, beside TRL's eval metrics, the held-out pairwise `accuracy` and `margin`
(mean chosen − rejected score, computed over every held-out pair) and `reward_stats` (mean/std of
the scores over a sample of the training responses), which PPO uses to normalise rewards.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, set_seed
from trl import RewardConfig, RewardTrainer, get_peft_config
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import DivergenceArguments, stage_callbacks
from rlhf.config import Recipe
from rlhf.data import prepare_datasets
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import load_sequence_classifier, load_tokenizer, merge_adapters
from rlhf.recipe import parse_recipe
from rlhf.rewards import is_encoder, reward_model_inputs, score_inputs


@dataclass
class RewardStageConfig(RewardConfig, DivergenceArguments):
    """RewardConfig plus how many training pairs the reward statistics are computed on, and the gradient-norm alarm."""

    reward_stats_samples: int = 512


SIDES = ("chosen", "rejected")


def pair_encode(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, config: PreTrainedConfig) -> Dataset:
    """An encoder's preference pairs as RewardTrainer's tokenised columns (`chosen_ids`, `rejected_ids`, plus
    `<side>_token_type_ids` when the model has segment embeddings), by `reward_model_inputs`."""

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        columns = {}
        for side in SIDES:
            inputs = reward_model_inputs(tokenizer, config, row["prompt"], row[side])
            columns[f"{side}_ids"] = inputs["input_ids"]
            if "token_type_ids" in inputs:
                columns[f"{side}_token_type_ids"] = inputs["token_type_ids"]
        return columns

    return dataset.map(encode, desc="Pair-encoding for the encoder")


class SegmentCollator(DataCollatorForPreference):
    """TRL's preference collator, plus the token type ids of pair-encoded inputs (chosen rows first, as TRL)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if "chosen_token_type_ids" in examples[0]:
            types = [torch.tensor(e[f"{side}_token_type_ids"]) for side in SIDES for e in examples]
            batch["token_type_ids"] = pad(types, padding_value=0, pad_to_multiple_of=self.pad_to_multiple_of)
        return batch


class EncoderRewardTrainer(RewardTrainer):
    """RewardTrainer that keeps the token type id columns (its signature columns would drop them)."""

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin"] + [
                f"{side}_token_type_ids" for side in SIDES
            ]


def score_pairs(
    model: PreTrainedModel, dataset: Dataset, pad_token_id: int, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and of the rejected responses of a tokenized preference dataset."""
    scores = []
    for side in SIDES:
        keys = {"input_ids": f"{side}_ids", "token_type_ids": f"{side}_token_type_ids"}
        keys = {key: column for key, column in keys.items() if column in dataset.column_names}
        inputs = [dict(zip(keys, values)) for values in zip(*(dataset[column] for column in keys.values()))]
        scores.append(score_inputs(model, inputs, pad_token_id, batch_size))
    return scores[0], scores[1]


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Exact pairwise accuracy and mean margin (chosen − rejected)."""
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "num_pairs": len(chosen),
    }


def reward_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Mean and std of all scores, which PPO uses to standardise rewards."""
    scores = torch.cat([chosen, rejected])
    return {"mean": scores.mean().item(), "std": scores.std().item(), "num_scores": len(scores)}


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    return parse_recipe(argv, RewardStageConfig, stage="reward", produced=produced)


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
    if model_args.use_peft and model_args.lora_task_type == "CAUSAL_LM":
        # SEQ_CLS makes PEFT train and save the whole score head (modules_to_save) beside the adapters.
        model_args.lora_task_type = "SEQ_CLS"

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "preference", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    set_seed(training_args.seed)  # the new score head is drawn at load time: seed it for reproducible runs
    model = load_sequence_classifier(model_args, tokenizer, num_labels=1, trust_remote_code=recipe.trust_remote_code)

    # The pad token RewardTrainer settles on (the recipe's `pad_token`, else the tokenizer's, else EOS).
    pad_id = tokenizer.convert_tokens_to_ids(training_args.pad_token or tokenizer.pad_token or tokenizer.eos_token)
    encoder = is_encoder(model.config)
    if encoder:
        # TRL would tokenise with the chat template; an encoder reads its native pair encoding instead.
        train_dataset = pair_encode(train_dataset, tokenizer, model.config)
        eval_dataset = pair_encode(eval_dataset, tokenizer, model.config) if eval_dataset is not None else None

    final_dir, resume_from = start_stage(training_args)
    trainer = (EncoderRewardTrainer if encoder else RewardTrainer)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=SegmentCollator(pad_id, training_args.pad_to_multiple_of) if encoder else None,
        peft_config=get_peft_config(model_args),
        callbacks=stage_callbacks(model_args, training_args),
    )

    eval_before = evaluate_before_training(trainer) if eval_dataset is not None else {}
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    eval_after = trainer.evaluate() if eval_dataset is not None else {}
    held_out = (
        pairwise_metrics(*score_pairs(trainer.model, trainer.eval_dataset, pad_id)) if eval_dataset is not None else {}
    )
    # One scoring pass over a training sample gives both the train accuracy and the reward statistics.
    train_sample = trainer.train_dataset.select(
        range(min(training_args.reward_stats_samples, len(trainer.train_dataset)))
    )
    train_scores = score_pairs(trainer.model, train_sample, pad_id)
    train_pairs = pairwise_metrics(*train_scores)
    stats = reward_statistics(*train_scores)
    merge_adapters(trainer)
    finish_stage(
        trainer,
        recipe,
        {
            "accuracy": held_out.get("accuracy"),
            "margin": held_out.get("margin"),
            "eval_pairs": held_out.get("num_pairs", 0),
            "train_accuracy": train_pairs["accuracy"],
            "reward_stats": stats,
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
