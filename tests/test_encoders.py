"""Encoders (BERT, ModernBERT) as reward models: trained on their native pair encoding and scored the same way
by the reward stage, PPO, GRPO and `rlhf eval`; PPO's value model is then derived from the policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification
from trl import ModelConfig, RewardTrainer

from rlhf.artifacts import read_metrics
from rlhf.config import ModelArguments, RecipeError
from rlhf.evaluation.context import EvalConfig, Judge, Models
from rlhf.evaluation.runner import evaluate
from rlhf.evaluation.sections import held_out_pairs
from rlhf.modeling import load_sequence_classifier, load_tokenizer
from rlhf.ppo.rollout import RewardSources
from rlhf.rewards import RewardSourceArguments, is_encoder
from rlhf.stages import grpo, reward
from tests.conftest import write_recipe
from tests.encoders import MAX_EVAL_SAMPLES, REWARD_MAX_LENGTH, train_encoder_reward
from tests.test_grpo import ONLINE
from tests.test_ppo import run_ppo

pytest_plugins = ["tests.encoders"]
SIDES = ("chosen", "rejected")

PROMPT = [{"role": "user", "content": "Hello there!"}]
RESPONSE = "Hello! How can I help you"


def native_score(checkpoint: Path, prompt: str, response: str) -> float:
    """The score a plainly loaded encoder gives `tokenizer(prompt, response)`: its own pair encoding and pooling."""
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        return model(**tokenizer(prompt, response, return_tensors="pt")).logits[0, 0].item()


def test_the_encoder_test_tells_encoders_from_causal_lms(tiny_bert: Path, tiny_modernbert: Path, tiny_checkpoint):
    assert is_encoder(AutoConfig.from_pretrained(tiny_bert)) and is_encoder(AutoConfig.from_pretrained(tiny_modernbert))
    assert not is_encoder(AutoConfig.from_pretrained(tiny_checkpoint))  # Llama: is_decoder is False there too


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_reward_stage_trains_an_encoder_on_its_pair_encoding(
    family: str, tiny_bert: Path, tiny_modernbert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    base = {"bert": tiny_bert, "modernbert": tiny_modernbert}[family]
    seen: list[dict[str, torch.Tensor]] = []
    compute_loss = RewardTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(RewardTrainer, "compute_loss", recording)
    out = train_encoder_reward(base, tmp_path, num_train_epochs=1, max_steps=6)

    tokenizer = AutoTokenizer.from_pretrained(out)
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    batch = seen[0]
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = row[mask.bool()].tolist()
        # [CLS] prompt [SEP] response [SEP]: no chat template (no "<|im_start|>" word pieces), no EOS.
        assert ids[0] == cls_id and ids[-1] == sep_id and ids.count(sep_id) == 2, tokenizer.decode(ids)
        assert "im_start" not in tokenizer.decode(ids)
        assert (row[~mask.bool()] == pad_id).all()
    if family == "bert":  # segment B (the response and its [SEP]) has token type 1, as BERT's pair encoding
        types, ids = batch["token_type_ids"][0], batch["input_ids"][0]
        first_sep = ids.tolist().index(sep_id)
        assert (
            types[: first_sep + 1].eq(0).all()
            and types[first_sep + 1 : int(batch["attention_mask"][0].sum())].eq(1).all()
        )
    else:
        assert "token_type_ids" not in batch  # ModernBERT has no segment embeddings

    # The recorded held-out accuracy is reproduced by the native pair encoding of the saved model.
    metrics = read_metrics(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()

    def encode(row: dict, side: str) -> dict[str, torch.Tensor]:
        return tokenizer(row["prompt"][0]["content"], row[side][-1]["content"], return_tensors="pt")

    def score(row: dict, side: str) -> float:
        with torch.no_grad():
            return model(**encode(row, side)).logits[0, 0].item()

    # The first max_eval_samples held-out pairs, less those TRL drops for exceeding max_length.
    given = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()][:MAX_EVAL_SAMPLES]
    rows = [r for r in given if all(encode(r, s)["input_ids"].shape[1] <= REWARD_MAX_LENGTH for s in SIDES)]
    assert len(rows) == metrics["eval_pairs"] > 0
    accuracy = sum(score(r, "chosen") > score(r, "rejected") for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-6)


def test_one_score_for_a_pair_across_reward_stage_ppo_grpo_and_eval(bert_reward_checkpoint: Path):
    path = str(bert_reward_checkpoint)
    expected = native_score(bert_reward_checkpoint, PROMPT[0]["content"], RESPONSE)
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=path))
    model = load_sequence_classifier(ModelConfig(model_name_or_path=path), tokenizer)

    # The reward stage: its pair-encoded dataset columns, scored as for accuracy and reward_stats.
    pairs = Dataset.from_list(
        [
            {
                "prompt": PROMPT,
                "chosen": [{"role": "assistant", "content": RESPONSE}],
                "rejected": [{"role": "assistant", "content": "No."}],
            }
        ]
    )
    stage_score = reward.score_pairs(model, reward.pair_encode(pairs, tokenizer, model.config), tokenizer.pad_token_id)[
        0
    ]
    # PPO's reward sources (raw scores: no reward_stats given).
    ppo_values, _ = RewardSources(model, tokenizer, [], None, None, batch_size=4).values(
        [{"prompt": PROMPT}], [RESPONSE], torch.device("cpu")
    )
    # GRPO/RLOO: the reward function the stage hands TRL, called as TRL calls it.
    function, _ = grpo.encoder_reward_function(
        ModelArguments(model_name_or_path="unused"), RewardSourceArguments(reward_model_path=path)
    )
    grpo_score = function(prompts=[PROMPT], completions=[[{"role": "assistant", "content": RESPONSE}]])
    # `rlhf eval`'s judge.
    eval_score = Judge(EvalConfig(reward_model_path=path, rule_reward=None), Models(False)).model_scores(
        [{"prompt": PROMPT}], [RESPONSE]
    )
    scores = [stage_score.item(), ppo_values[0, 0].item(), grpo_score[0], eval_score[0]]
    assert scores == pytest.approx([expected] * 4, abs=1e-6), scores


def test_ppo_with_an_encoder_reward_model_uses_a_value_head_on_the_policy(
    tiny_sft_checkpoint: Path, bert_reward_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture
):
    metrics = run_ppo(
        tmp_path,
        "ppo",
        tiny_sft_checkpoint,
        reward_model_path=str(bert_reward_checkpoint),
        reward_min_accuracy=0,
        max_steps=2,
        num_ppo_epochs=1,
        max_eval_samples=8,
    )
    assert metrics["train"]["train_updates"] == 2
    assert metrics["value_model"]["path"] == str(tiny_sft_checkpoint) and "encoder" in metrics["value_model"]["reason"]
    assert capfd.readouterr().err.count("PPO value model:") == 1  # said once, with the reason
    assert metrics["reward_stats"] is not None and all(
        isinstance(metrics["eval"][key], float) for key in ("eval_reward", "eval_kl")
    )


def test_an_explicit_encoder_value_model_is_refused_before_loading(
    tiny_sft_checkpoint: Path, bert_reward_checkpoint: Path, tmp_path: Path
):
    with pytest.raises(RecipeError, match=r"value_model_path: .* is an encoder \(bert\).*tokenizer differs"):
        run_ppo(
            tmp_path,
            "refused",
            tiny_sft_checkpoint,
            reward_funcs=["rlhf.data.synthetic:rule_reward"],
            value_model_path=str(bert_reward_checkpoint),
        )
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.incomplete").exists()


def test_grpo_scores_an_encoder_reward_model_on_its_pair_encoding(
    tiny_sft_checkpoint: Path, bert_reward_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    tokenizer = AutoTokenizer.from_pretrained(bert_reward_checkpoint)
    seen: list[torch.Tensor] = []
    forward = BertForSequenceClassification.forward

    def recording(self, input_ids=None, attention_mask=None, **kwargs):
        seen.append(input_ids[attention_mask.bool()][: int(attention_mask[0].sum())].cpu())
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", recording)
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_model_path=str(bert_reward_checkpoint),
        reward_min_accuracy=0,
        output_dir=str(out),
        **ONLINE,
    )
    grpo.main([str(recipe)])
    assert seen, "the reward model never scored"
    first = seen[0].tolist()
    assert first[0] == tokenizer.cls_token_id and first.count(tokenizer.sep_token_id) == 2, tokenizer.decode(first)
    history = (out / "trainer_state.json").read_text()
    assert "rewards/reward/mean" in history  # logged under the name TRL gives a reward model


def test_eval_scores_an_encoder_reward_model_on_its_pair_encoding(
    tiny_sft_checkpoint: Path, bert_reward_checkpoint: Path, tmp_path: Path
):
    out = evaluate(
        [tiny_sft_checkpoint],
        output=tmp_path / "eval",
        sections=["generation", "reward_model"],
        reward_model_path=str(bert_reward_checkpoint),
        num_prompts=6,
        max_new_tokens=8,
        num_preference_pairs=16,
        html=False,
    )
    result = json.loads((out / "eval.json").read_text())["results"]["sft"]
    # Every generated answer's score is the encoder's own score of `tokenizer(prompt, answer)`.
    for sample, score in zip(result["samples"], result["scores"]["reward_model"]):
        assert score == pytest.approx(
            native_score(bert_reward_checkpoint, sample["prompt"], sample["response"]), abs=1e-5
        )
    # The reward section's pairwise accuracy is that of the pair encoding on the same preference rows.
    rows = held_out_pairs(EvalConfig(reward_model_path=str(bert_reward_checkpoint)))[0][:16]
    wins = [
        native_score(bert_reward_checkpoint, r["prompt"][0]["content"], r["chosen"][-1]["content"])
        > native_score(bert_reward_checkpoint, r["prompt"][0]["content"], r["rejected"][-1]["content"])
        for r in rows
    ]
    assert result["reward_model"]["pairwise_accuracy"] == pytest.approx(sum(wins) / len(wins))
