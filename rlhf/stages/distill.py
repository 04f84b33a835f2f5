"""Knowledge distillation: train a smaller student to match a teacher's next-token distribution.

rlhf train recipes/tiny/distill.yaml

`distillation_mode` picks the trainer:
- `offline` (default): TRL's SFTTrainer on the SFT data, with the loss replaced by
  alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · cross-entropy on the same (assistant) tokens,
  where `temperature` T softens both distributions and `beta` (TRL's generalized JSD: 0 = forward
  KL, 1 = reverse KL) picks the divergence.
- `on_policy`: TRL's DistillationTrainer; the student generates completions to the prompts and is
  trained on the teacher's distribution over them (generalized JSD with `beta`).
- `gkd`: TRL's experimental GKDTrainer, mixing on-policy (`lmbda` fraction) and dataset sequences.

The student is `model_name_or_path` as saved, or, when any `student_*` key is set, a fresh model
built from that checkpoint's config with those sizes changed (same tokenizer and vocabulary).
Teacher and student must share the tokenizer; that is checked before any model loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, set_seed
from trl import DistillationConfig, DistillationTrainer, SFTTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.models.utils import prepare_deepspeed

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import regularization_callbacks
from rlhf.config import ModelArguments, Recipe, RecipeError
from rlhf.data import prepare_datasets
from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer
from rlhf.recipe import parse_recipe
from rlhf.token_checks import check_tokenizer_fit

MODES = ("offline", "on_policy", "gkd")


@dataclass
class DistillStageConfig(GKDConfig):
    """GKDConfig (temperature, lmbda, beta, max_new_tokens, teacher_model_name_or_path, …) plus the mode,
    the cross-entropy mix of offline distillation, and the sizes of a freshly initialised student."""

    distillation_mode: str = field(default="offline", metadata={"help": "offline, on_policy or gkd."})
    alpha: float = field(
        default=0.5, metadata={"help": "offline: weight of the distillation loss; 1 - alpha goes to cross-entropy."}
    )
    # TRL's GKD defaults are a sampling temperature of 0.9 and JSD (beta 0.5); classic offline
    # distillation is forward KL at temperature 1 unless the recipe says otherwise.
    temperature: float = 1.0
    beta: float = 0.0
    student_hidden_size: int | None = None
    student_num_layers: int | None = None
    student_intermediate_size: int | None = None
    student_num_attention_heads: int | None = None
    measure_quality: bool = field(
        default=True, metadata={"help": "measure rule score, perplexity and latency of teacher and student."}
    )


class OfflineDistillationTrainer(SFTTrainer):
    """SFTTrainer whose loss mixes the teacher's softened distribution (KL) with the data's cross-entropy."""

    def __init__(self, *args: Any, teacher_model: PreTrainedModel, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            # accelerate's prepare_model leaves a model alone under DeepSpeed; under ZeRO-3 the teacher was built
            # partitioned and needs an engine to gather its weights in forward (as TRL's GKDTrainer does).
            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        forward = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        outputs = model(**forward, use_cache=False)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_logits = self.teacher_model(**forward, use_cache=False).logits
        # Logits at position i predict token i + 1; labels are -100 outside the trained (assistant) tokens.
        labels = inputs["labels"][:, 1:]
        student_logits = outputs.logits[:, :-1]
        divergence = GKDTrainer.generalized_jsd_loss(
            student_logits,
            teacher_logits[:, :-1],
            labels=labels,
            beta=args.beta,
            temperature=args.temperature,
            num_items_in_batch=num_items_in_batch,
        )
        tokens = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum().clamp(min=1)
        cross_entropy = (
            torch.nn.functional.cross_entropy(
                student_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            / tokens
        )
        # T² keeps the soft-target gradients on the same scale as the hard ones (Hinton et al., 2015).
        loss = args.alpha * args.temperature**2 * divergence + (1 - args.alpha) * cross_entropy
        return (loss, outputs) if return_outputs else loss


def check_distillation(recipe: Recipe) -> None:
    """Mode, alpha, teacher path and teacher/student tokenizer compatibility, before any model loads."""
    args = recipe.training
    if args.distillation_mode not in MODES:
        raise RecipeError(f"distillation_mode: got {args.distillation_mode!r}, expected one of {', '.join(MODES)}.")
    if not 0 <= args.alpha <= 1:
        raise RecipeError(f"alpha: got {args.alpha}, expected a weight between 0 and 1.")
    if args.temperature <= 0:
        raise RecipeError(f"temperature: got {args.temperature}, expected a positive number (e.g. 1.0 or 2.0).")
    if not args.teacher_model_name_or_path:
        raise RecipeError(
            "teacher_model_name_or_path: missing; set it to the teacher checkpoint, e.g. outputs/tiny/sft."
        )
    trust = recipe.trust_remote_code
    student_tokenizer = AutoTokenizer.from_pretrained(recipe.model.model_name_or_path, trust_remote_code=trust)
    teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher_model_name_or_path, trust_remote_code=trust)
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = len(set(student_vocab.items()) ^ set(teacher_vocab.items()))
        raise RecipeError(
            f"teacher_model_name_or_path: the teacher's tokenizer differs from the student's "
            f"({len(teacher_vocab)} vs {len(student_vocab)} tokens, {differing} differing entries); logit distillation "
            "compares distributions token by token, so use a student with the teacher's tokenizer (or set student_* "
            "keys to build one from the teacher's checkpoint)."
        )
    student_config = AutoConfig.from_pretrained(recipe.model.model_name_or_path, trust_remote_code=trust)
    teacher_config = AutoConfig.from_pretrained(args.teacher_model_name_or_path, trust_remote_code=trust)
    student_size = student_config.get_text_config().vocab_size
    teacher_size = teacher_config.get_text_config().vocab_size
    if student_size != teacher_size:
        raise RecipeError(
            f"teacher_model_name_or_path: the teacher's output layer has {teacher_size} tokens and the student's "
            f"{student_size}; they must match for logit distillation."
        )
    heads = args.student_num_attention_heads or getattr(student_config, "num_attention_heads", None)
    if args.student_hidden_size and heads and args.student_hidden_size % heads:
        raise RecipeError(
            f"student_hidden_size: {args.student_hidden_size} is not divisible by {heads} attention heads; "
            "pick a multiple or set student_num_attention_heads."
        )


def build_student(recipe: Recipe) -> PreTrainedModel:
    """The student: the checkpoint as saved, or a fresh model from its config with the `student_*` sizes."""
    args = recipe.training
    sizes = {
        "hidden_size": args.student_hidden_size,
        "num_hidden_layers": args.student_num_layers,
        "intermediate_size": args.student_intermediate_size,
        "num_attention_heads": args.student_num_attention_heads,
    }
    if all(v is None for v in sizes.values()):
        return load_causal_lm(recipe.model, recipe.trust_remote_code)
    config = AutoConfig.from_pretrained(recipe.model.model_name_or_path, trust_remote_code=recipe.trust_remote_code)
    old_hidden, old_heads = config.hidden_size, config.num_attention_heads
    hidden = sizes["hidden_size"] or old_hidden
    heads = sizes["num_attention_heads"] or old_heads
    config.hidden_size = hidden
    config.num_hidden_layers = sizes["num_hidden_layers"] or config.num_hidden_layers
    config.intermediate_size = sizes["intermediate_size"] or config.intermediate_size * hidden // old_hidden
    # Keep the teacher's grouped-query ratio.
    config.num_key_value_heads = max(1, heads * getattr(config, "num_key_value_heads", old_heads) // old_heads)
    config.num_attention_heads = heads
    config.head_dim = hidden // heads
    return AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.trust_remote_code)


def count_parameters(model: PreTrainedModel) -> int:
    """`model.num_parameters()`, also when DeepSpeed ZeRO-3 built the model partitioned: there a parameter's
    numel() is the size of this process's slice (0 for most), and `ds_numel` the whole parameter's."""
    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        return sum(p.ds_numel for p in model.parameters())
    return model.num_parameters()


def _on_policy_config(args: DistillStageConfig) -> DistillationConfig:
    """The DistillationConfig carrying this recipe's shared settings (max_new_tokens → max_completion_length)."""
    names = {f.name for f in dataclasses.fields(DistillationConfig) if f.init}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in names}
    values["max_completion_length"] = args.max_new_tokens
    return DistillationConfig(**values)


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    return parse_recipe(argv, DistillStageConfig, stage="distill", produced=produced)


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
    check_distillation(recipe)
    mode = training_args.distillation_mode

    target = "prompt_only" if mode == "on_policy" else "sft"
    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, target, training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    data_report["tokenizer_fit"] = check_tokenizer_fit(tokenizer, train_dataset)
    teacher_args = ModelArguments(
        model_name_or_path=training_args.teacher_model_name_or_path,
        dtype=model_args.dtype,
        allow_pickle_weights=model_args.allow_pickle_weights,
    )
    teacher = load_causal_lm(teacher_args, recipe.trust_remote_code).eval()
    set_seed(training_args.seed)  # a resized student is initialised at random: the same in every run
    student = build_student(recipe)
    align_generation_config(student, tokenizer)
    align_generation_config(teacher, tokenizer)
    sizes = {"teacher": count_parameters(teacher), "student": count_parameters(student)}
    sizes["student_fraction"] = sizes["student"] / sizes["teacher"]

    final_dir, resume_from = start_stage(training_args)
    if mode in ("offline", "gkd"):
        trainer_class = OfflineDistillationTrainer if mode == "offline" else GKDTrainer
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=regularization_callbacks(model_args),
        )
    else:
        tokenizer.padding_side = "left"  # DistillationTrainer generates from left-padded prompts
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=_on_policy_config(training_args),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=regularization_callbacks(model_args),
        )

    train_result = trainer.train(resume_from_checkpoint=resume_from)
    eval_after = trainer.evaluate() if eval_dataset is not None and mode != "on_policy" else {}
    metrics: dict[str, Any] = {"mode": mode, "parameters": sizes, "train": train_result.metrics, "eval": eval_after}
    if training_args.measure_quality:
        from rlhf.compress import quality_report

        student.eval()
        metrics["teacher"] = quality_report(teacher, tokenizer)
        metrics["student"] = quality_report(trainer.model, tokenizer)
        metrics["student_rule_score_fraction"] = metrics["student"]["rule_score"] / max(
            metrics["teacher"]["rule_score"], 1e-9
        )
    metrics["data"] = data_report
    finish_stage(trainer, recipe, metrics, final_dir)


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
