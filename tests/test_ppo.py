"""PPO: the math against hand-computed values, and short real runs on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import ModelConfig

from rlhf.artifacts import incomplete_dir
from rlhf.callbacks import health_callbacks
from rlhf.config import ModelArguments, RecipeError
from rlhf.data.synthetic import make_synthetic_dataset, rule_reward
from rlhf.distributed import cpu_has_native_bf16
from rlhf.entrypoint import run
from rlhf.modeling import align_generation_config, load_causal_lm, load_sequence_classifier, load_tokenizer
from rlhf.ppo import (
    AdaptiveKLController,
    HealthMonitor,
    PPOConfig,
    PPOTrainer,
    compute_gae,
    kl_penalty,
    policy_loss,
    response_mask,
    shape_rewards,
    value_loss,
    whiten,
)
from rlhf.ppo.checkpoint import PPO_STATE_FILE, load_checkpoint, save_checkpoint
from rlhf.ppo.models import ValueHead
from rlhf.ppo.timing import PARTS
from rlhf.rewards import reward_model_record
from rlhf.stages import ppo
from tests.conftest import write_recipe

# ---- the math -------------------------------------------------------------------------------


def test_response_mask_keeps_tokens_up_to_and_including_the_first_stop_token():
    responses = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask(responses, stop_token_ids=1), expected)
    assert torch.equal(response_mask(responses, stop_token_ids=[1, 99]), expected)
    assert response_mask(responses, stop_token_ids=None).all()


def test_kl_estimators_match_hand_computed_values():
    logprobs, ref_logprobs = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.25]))
    # k1 = log p - log q; k3 = (q/p - 1) - log(q/p)
    assert torch.allclose(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([math.log(2), 0.0]))
    assert torch.allclose(kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor([-0.5 + math.log(2), 0.0]))


def test_gae_matches_hand_computed_values_and_ignores_masked_tokens():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ2 = 1 - .7 = .3; δ1 = .7 - .6 = .1 → A1 = .1 + .5·.3; δ0 = .6 - .5 = .1 → A0 = .1 + .5·.25
    # row 1: the last token is masked (reward 5 and value 9 ignored): δ1 = 1 - .4 = .6; δ0 = .4 - .2 → A0 = .2 + .5·.6
    assert torch.allclose(advantages, torch.tensor([[0.225, 0.25, 0.3], [0.5, 0.6, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.725, 0.85, 1.0], [0.7, 1.0, 0.0]]))
    discounted, _ = compute_gae(rewards[:1], torch.zeros(1, 3), mask[:1], gamma=0.5, lam=1.0)
    assert torch.allclose(discounted, torch.tensor([[0.25, 0.5, 1.0]]))


def test_shaped_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    rewards, kl_part = shape_rewards(torch.tensor([3.0, -1.0]), kl * mask, mask, kl_coef=0.1)
    assert torch.allclose(kl_part, torch.tensor([[-0.05, -0.1, 0.0], [-0.1, -0.1, -0.1]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.9, 0.0], [-0.1, -0.1, -1.1]]))


def test_whiten_uses_masked_unbiased_statistics():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert torch.allclose(whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)
    assert torch.allclose(whiten(values, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-4)


def test_clipped_policy_loss_matches_hand_computed_values():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0, 3.0]]))
    advantages = torch.tensor([[1.0, -1.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)  # the last token is padding
    loss, clipfrac, approx_kl = policy_loss(new, old, advantages, mask, cliprange=0.2)
    # max(-A·r, -A·clip(r)): 1.5→max(-1.5,-1.2)=-1.2 (clipped); 0.5,A=-1→max(.5,.8)=.8 (clipped); r=1→-2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3, abs=1e-6)


def test_clipped_value_loss_matches_hand_computed_values():
    new, old = torch.tensor([[1.0, 0.0, 0.55]]), torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[1.0, 0.0, 0.6]])
    loss, clipfrac = value_loss(new, old, returns, torch.ones(1, 3, dtype=torch.bool), cliprange_value=0.2)
    # clipped values .7, .3, .55 → squared errors max(0, .09), max(0, .09), max(.0025, .0025)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.09 + 0.0025) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_adaptive_kl_controller_moves_toward_the_target_with_clipped_error():
    controller = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=100)
    controller.update(current_kl=60.0, num_episodes=10)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * 1.02)
    controller.update(current_kl=5.4, num_episodes=10)  # error -0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * 0.99)
    restored = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=100)
    restored.load_state_dict(controller.state_dict())  # what a checkpoint keeps
    assert restored.value == controller.value


def test_health_monitor_flags_numbers_ppo_cannot_go_on_from():
    monitor = HealthMonitor(max_grad_norm_alarm=100.0)
    assert monitor.check_step(loss=0.5, grad_norm=3.0) is None
    assert monitor.check_step(loss=float("nan"), grad_norm=3.0) == "loss nan"
    assert monitor.check_step(loss=0.5, grad_norm=float("inf")) == "gradient norm inf"
    assert monitor.check_step(loss=0.5, grad_norm=250.0) == "gradient norm 250 > max_grad_norm_alarm 100"
    assert HealthMonitor().check_step(loss=0.5, grad_norm=1e30) is None  # no alarm set: only NaN/inf stop
    assert monitor.nonfinite_metric({"objective/kl": 1.0, "loss/value_avg": float("nan")}) == "loss/value_avg nan"
    assert monitor.nonfinite_metric({"objective/kl": 1.0}) is None


# ---- short real runs ----------------------------------------------------------------------------

CALLS = {"count": 0, "crash_after": None}


def polite_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """A reward a tiny model learns in a minute: say sorry (a phrase the SFT model already knows)."""
    return [float("sorry" in c[0]["content"].lower()) for c in completions]


def crashing_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """polite_reward that raises after CALLS['crash_after'] calls: a run killed half-way."""
    CALLS["count"] += 1
    if CALLS["crash_after"] is not None and CALLS["count"] > CALLS["crash_after"]:
        raise KeyboardInterrupt("simulated kill")
    return polite_reward(prompts, completions)


PPO_FAST = {
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
    "dataset_name": "synthetic:prompts",
    "synthetic_num_examples": 400,
    "max_eval_samples": 48,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 48,
    "num_ppo_epochs": 4,
    "response_length": 10,
    "temperature": 1.0,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "save_strategy": "no",
}


def run_ppo(tmp_path: Path, name: str, checkpoint: Path, **keys) -> dict:
    out = tmp_path / name
    recipe = write_recipe(
        tmp_path / f"{name}.yaml",
        stage="ppo",
        model_name_or_path=str(checkpoint),
        output_dir=str(out),
        **{**PPO_FAST, **keys},
    )
    ppo.main([str(recipe)])
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def kl_runs(tiny_sft_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[float, dict]:
    """The same short PPO run with a tiny and a large KL coefficient."""
    tmp = tmp_path_factory.mktemp("ppo_kl")
    return {
        kl_coef: run_ppo(
            tmp,
            f"kl{kl_coef}",
            tiny_sft_checkpoint,
            reward_funcs=["tests.test_ppo:polite_reward"],
            max_steps=10,
            kl_coef=kl_coef,
        )
        for kl_coef in (0.0, 2.0)
    }


def test_ppo_raises_the_mean_reward(kl_runs: dict[float, dict]):
    metrics = kl_runs[0.0]
    assert metrics["eval"]["eval_reward"] > metrics["eval_before"]["eval_before_reward"] + 0.2, metrics
    assert metrics["train"]["train_updates"] == 10
    assert metrics["eval_before"]["eval_before_kl"] == pytest.approx(0.0, abs=1e-4)


def test_a_large_kl_coef_keeps_the_policy_closer_to_the_reference(kl_runs: dict[float, dict]):
    assert kl_runs[2.0]["eval"]["eval_kl"] < kl_runs[0.0]["eval"]["eval_kl"], (
        kl_runs[2.0]["eval"],
        kl_runs[0.0]["eval"],
    )


def test_attention_dropout_from_the_checkpoint_config_is_off_in_ppo(tiny_checkpoint: Path, tmp_path: Path):
    # An SFT recipe's `dropout` is written into every dropout field of the config. Llama's attention has no
    # nn.Dropout: it applies the float `attention_dropout` while training, which TRL's disable_dropout_in_model
    # left on. Under LoRA the reference is the policy itself with adapters off, so even before any step the two
    # forwards drew different dropout masks: KL far from 0 at update 1, and a PPO ratio off 1.
    checkpoint = tmp_path / "attention_dropout"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attention_dropout=0.5).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(checkpoint)
    metrics = run_ppo(
        tmp_path,
        "dropout",
        checkpoint,
        reward_funcs=["tests.test_ppo:polite_reward"],
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        learning_rate=0.0,  # the policy stays the reference: every log-prob must match it
        max_steps=2,
        per_device_train_batch_size=8,
        num_ppo_epochs=1,
        synthetic_num_examples=64,
        max_eval_samples=8,
    )
    history = json.loads((tmp_path / "dropout" / "trainer_state.json").read_text())["log_history"]
    assert metrics["eval_before"]["eval_before_kl"] == pytest.approx(0.0, abs=1e-5)
    for update in history:
        assert update["objective/kl"] == pytest.approx(0.0, abs=1e-5), update
        assert update["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-7), update
        assert update["val/ratio"] == pytest.approx(1.0, abs=1e-6), update


def test_every_update_logs_where_its_time_went(tiny_checkpoint: Path, tmp_path: Path):
    run_ppo(
        tmp_path,
        "timing",
        tiny_checkpoint,
        reward_funcs=["tests.test_ppo:polite_reward"],
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,  # 2 minibatches of 2 micro-batches each
        num_mini_batches=2,
        num_ppo_epochs=1,
        response_length=6,
        synthetic_num_examples=64,
        max_eval_samples=4,
    )
    history = json.loads((tmp_path / "timing" / "trainer_state.json").read_text())["log_history"]
    parts = [f"timing/{part}" for part in PARTS]
    assert len(history) == 2
    for update in history:
        assert set(parts) | {"timing/other", "timing/update"} <= set(update), update
        assert all(update[part] >= 0 for part in parts), update
        assert all(update[part] > 0 for part in ("timing/generation", "timing/training", "timing/optimizer"))
        # The parts never overlap and all run inside the update: together they take at most its time.
        assert sum(update[part] for part in parts) <= update["timing/update"] + 1e-6, update
        assert update["timing/other"] == pytest.approx(
            update["timing/update"] - sum(update[part] for part in parts), abs=1e-6
        )
        assert update["timing/other"] >= -1e-6


def build_reward_dir(checkpoint: Path, out: Path, accuracy: float) -> Path:
    """A reward-stage-like output: a sequence classifier (random score head) and its metrics.json."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    metrics = {
        "stage": "reward",
        "accuracy": accuracy,
        "eval": {"eval_accuracy": accuracy},
        "reward_stats": {"mean": 0.1, "std": 2.0},
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


def test_lora_reference_is_the_policy_with_adapters_disabled(tiny_sft_checkpoint: Path, tmp_path: Path):
    reward_dir = build_reward_dir(tiny_sft_checkpoint, tmp_path / "reward", accuracy=0.9)
    model_args = ModelConfig(model_name_or_path=str(tiny_sft_checkpoint))
    tokenizer = load_tokenizer(model_args)
    policy = load_causal_lm(model_args)
    align_generation_config(policy, tokenizer)
    base_numel = sum(p.numel() for p in policy.parameters())
    reward_model = load_sequence_classifier(ModelConfig(model_name_or_path=str(reward_dir)), tokenizer)
    value_model = load_sequence_classifier(ModelConfig(model_name_or_path=str(reward_dir)), tokenizer)
    args = PPOConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=8,
        num_ppo_epochs=2,
        response_length=8,
        max_steps=2,
        learning_rate=5e-2,
        save_strategy="no",
        reward_weights=[0.5, 1.0],
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        train_dataset=make_synthetic_dataset("prompts", 64, seed=0),
        value_model=value_model,
        reward_funcs=[rule_reward],
        reward_stats=reward_model_record(str(reward_dir)).stats,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None
    # One base copy: the policy's distinct weight storages add up to the base model plus the small adapters.
    storages = {p.data_ptr(): p.numel() for p in trainer.policy.parameters()}
    adapters = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
    assert sum(storages.values()) - adapters <= base_numel and 0 < adapters < base_numel / 10
    trainer.train()

    ids = torch.tensor(
        [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_dict=False
            )
            + tokenizer("Hello! How can I help you", add_special_tokens=False)["input_ids"]
        ]
    )
    mask = torch.ones_like(ids)
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint)
    with torch.no_grad():
        base_logits = fresh_base(input_ids=ids, attention_mask=mask).logits
        with trainer.reference() as reference:
            ref_logits = reference(input_ids=ids, attention_mask=mask).logits
        policy_logits = trainer.policy(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ref_logits, base_logits, atol=1e-5)
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3)  # the adapters did train

    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, policy_logits, atol=1e-4)


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_sft_checkpoint: Path, tmp_path: Path):
    keys = dict(
        reward_funcs=["tests.test_ppo:crashing_reward"],
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        num_ppo_epochs=1,
        max_eval_samples=16,
    )
    # One reward call evaluates before training, then one per update: crash during update 3.
    CALLS.update(count=0, crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(tmp_path, "resume", tiny_sft_checkpoint, **keys)
    incomplete = tmp_path / "resume.incomplete"
    assert not (tmp_path / "resume").exists()
    # Accelerator.save_state's files (weights, optimizer, scheduler, RNG), the PPO state as JSON, trainer state last.
    written = {p.name for p in (incomplete / "checkpoint-2").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", PPO_STATE_FILE} <= written
    assert not [name for name in written if name.startswith("custom_checkpoint")]  # nothing pickled by accelerate
    ppo_state = json.loads((incomplete / "checkpoint-2" / PPO_STATE_FILE).read_text())
    assert ppo_state["prompt_order"] == {"next_update": 2} and set(ppo_state) == {
        "kl_controller",
        "health",
        "prompt_order",
    }
    saved = json.loads((incomplete / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["global_step"] == 2

    CALLS.update(count=0, crash_after=None)
    metrics = run_ppo(tmp_path, "resume", tiny_sft_checkpoint, **keys)
    assert metrics["train"]["train_updates"] == 4
    history = json.loads((tmp_path / "resume" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    assert CALLS["count"] == 1 + 2 + 1  # eval before, updates 3 and 4 only, eval after
    assert not incomplete.exists() and not list((tmp_path / "resume").glob("checkpoint-*"))


def test_quality_gate_rejects_a_weak_reward_model(tiny_checkpoint: Path, tmp_path: Path):
    reward_dir = build_reward_dir(tiny_checkpoint, tmp_path / "reward", accuracy=0.5)
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_checkpoint),
        output_dir=str(tmp_path / "out"),
        reward_model_path=str(reward_dir),
        reward_min_accuracy=0.95,
        **PPO_FAST,
    )
    with pytest.raises(RecipeError, match="(?i)accuracy"):
        ppo.main([str(recipe)])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_health_stop_ends_the_run_with_one_line_and_publishes_nothing(
    tiny_sft_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    # Entropy can never reach 100 nats: the first update's log trips the alarm, before any checkpoint.
    recipe = write_recipe(
        tmp_path / "stop.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_sft_checkpoint),
        output_dir=str(tmp_path / "stop"),
        **{
            **PPO_FAST,
            "reward_funcs": ["tests.test_ppo:polite_reward"],
            "max_steps": 3,
            "num_ppo_epochs": 1,
            "max_eval_samples": 16,
            "min_entropy": 100.0,
            "health_action": "stop",
        },
    )
    with pytest.raises(SystemExit):
        run(ppo.main, [str(recipe)])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "health alarm entropy_collapse at step 1" in line and "no checkpoint was saved" in line, line
    # Nothing published, and with no checkpoint to resume from nothing is left behind (as in every stage).
    assert not (tmp_path / "stop").exists() and not incomplete_dir(tmp_path / "stop").exists()


def test_a_plain_sequence_classifier_without_metrics_is_used_with_raw_scores(
    tiny_sft_checkpoint: Path, tiny_reward_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # A Hub-style reward model: only weights and tokenizer, no metrics.json from the reward stage.
    plain = tmp_path / "plain_reward"
    AutoModelForSequenceClassification.from_pretrained(tiny_reward_checkpoint).save_pretrained(plain)
    AutoTokenizer.from_pretrained(tiny_reward_checkpoint).save_pretrained(plain)
    assert not (plain / "metrics.json").exists()
    with caplog.at_level("WARNING", logger="rlhf.stages.ppo"):
        metrics = run_ppo(
            tmp_path,
            "plain",
            tiny_sft_checkpoint,
            reward_model_path=str(plain),
            reward_min_accuracy=0,
            max_steps=1,
            num_ppo_epochs=1,
            max_eval_samples=8,
        )
    assert metrics["train"]["train_updates"] == 1
    assert metrics["reward_stats"] is None and metrics["reward_model_accuracy"] is None
    # A causal reward model with the policy's tokenizer is where the value model starts by default.
    assert metrics["value_model"] == {
        "path": str(plain),
        "reason": "the reward model, which shares the policy's tokenizer",
    }
    assert len([r for r in caplog.records if "raw scores" in r.getMessage()]) == 1  # said once
    assert math.isfinite(metrics["eval"]["eval_reward"])


def _tiny_trainer(checkpoint: Path, output_dir: Path, **config) -> PPOTrainer:
    """A PPOTrainer on the tiny model (tied embeddings) with a rule reward, built directly."""
    model_args = ModelConfig(model_name_or_path=str(checkpoint))
    tokenizer = load_tokenizer(model_args)
    policy = load_causal_lm(model_args)
    align_generation_config(policy, tokenizer)
    torch.manual_seed(0)
    args = PPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        num_ppo_epochs=1,
        response_length=4,
        max_steps=1,
        save_strategy="no",
        **config,
    )
    return PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=None,
        train_dataset=make_synthetic_dataset("prompts", 8, seed=0),
        value_model=load_sequence_classifier(model_args, tokenizer),
        reward_funcs=[rule_reward],
        callbacks=health_callbacks(args),
    )


def test_checkpoints_restore_tied_weights_and_refuse_missing_ones(tiny_checkpoint: Path, tmp_path: Path):
    trainer = _tiny_trainer(tiny_checkpoint, tmp_path / "out")
    assert trainer.policy.config.tie_word_embeddings
    trainer.train()
    trainer.kl_controller.value = 0.123  # as an adaptive controller would have moved it
    folder = save_checkpoint(trainer.accelerator, trainer.state, trainer.args.output_dir, None, trainer.checkpointed)
    trained = {name: value.clone() for name, value in trainer.model.state_dict().items()}

    fresh = _tiny_trainer(tiny_checkpoint, tmp_path / "out")
    load_checkpoint(fresh.accelerator, fresh.state, folder, fresh.checkpointed)
    assert fresh.state.global_step == 1
    assert fresh.kl_controller.value == 0.123 and fresh.prompt_order.next_update == 1
    assert fresh.health_alarms.rules.initial_length == trainer.health_alarms.rules.initial_length is not None
    restored = fresh.model.state_dict()
    assert all(torch.equal(restored[name], value) for name, value in trained.items())
    policy = fresh.policy
    assert policy.lm_head.weight.data_ptr() == policy.get_input_embeddings().weight.data_ptr()  # still tied

    weights = load_file(folder / "model.safetensors")
    dropped = next(name for name in weights if "layers.0" in name)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors")
    with pytest.raises(RuntimeError, match="(?i)missing"):
        load_checkpoint(_tiny_trainer(tiny_checkpoint, tmp_path / "out").accelerator, fresh.state, folder)

    # A checkpoint whose PPO state is not JSON (an older rlhf pickled it) is refused, never unpickled.
    (folder / PPO_STATE_FILE).unlink()
    with pytest.raises(RecipeError, match=PPO_STATE_FILE):
        load_checkpoint(fresh.accelerator, fresh.state, folder, fresh.checkpointed)


def test_reward_and_value_models_load_with_the_policy_settings():
    policy_args = ModelArguments(model_name_or_path="policy", dtype="float32", allow_pickle_weights=True)
    sibling = ppo.sibling_model_args(policy_args, "reward")
    assert isinstance(sibling, ModelArguments) and sibling.model_name_or_path == "reward"
    assert sibling.allow_pickle_weights and sibling.dtype == "float32"


def test_save_total_limit_keeps_the_newest_checkpoints(tiny_checkpoint: Path, tmp_path: Path):
    trainer = _tiny_trainer(tiny_checkpoint, tmp_path / "out")
    for step in (1, 2, 3):
        trainer.state.global_step = step
        save_checkpoint(trainer.accelerator, trainer.state, trainer.args.output_dir, save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_shared_value_head_trains_and_saves_only_the_policy(tiny_sft_checkpoint: Path, tmp_path: Path):
    # A LoRA policy with no value_model_path gets a shared value head: policy, reference (adapters off) and critic
    # share one base.
    metrics = run_ppo(
        tmp_path,
        "shared",
        tiny_sft_checkpoint,
        reward_funcs=["tests.test_ppo:polite_reward"],
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        max_steps=3,
        num_ppo_epochs=2,
        max_eval_samples=16,
    )
    assert metrics["train"]["train_updates"] == 3 and metrics["value_model"]["path"] == "shared"
    assert "the default with LoRA" in metrics["value_model"]["reason"]
    assert math.isfinite(metrics["eval"]["eval_reward"])
    # The output is the policy alone: a plain causal LM with exactly the SFT checkpoint's weights' names,
    # the LoRA updates merged into them.
    saved, start = (
        load_file(tmp_path / "shared" / "model.safetensors"),
        load_file(tiny_sft_checkpoint / "model.safetensors"),
    )
    assert set(saved) == set(start)
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )
    AutoModelForCausalLM.from_pretrained(tmp_path / "shared")


def test_a_shared_value_head_trains_beside_lora_adapters_on_one_base(tiny_sft_checkpoint: Path, tmp_path: Path):
    # The trainable weights are the adapters and the head; every weight is stored once.
    model_args = ModelConfig(model_name_or_path=str(tiny_sft_checkpoint))
    tokenizer = load_tokenizer(model_args)
    policy = load_causal_lm(model_args)
    align_generation_config(policy, tokenizer)
    base_numel = sum(p.numel() for p in policy.parameters())
    trainer = PPOTrainer(
        args=PPOConfig(
            output_dir=str(tmp_path / "direct"),
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
            per_device_train_batch_size=4,
            num_ppo_epochs=1,
            response_length=4,
            max_steps=1,
            save_strategy="no",
        ),
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=None,
        train_dataset=make_synthetic_dataset("prompts", 8, seed=0),
        value_model=ValueHead.for_policy(policy),
        reward_funcs=[rule_reward],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None
    storages = {p.data_ptr(): p.numel() for p in trainer.model.parameters()}
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in trainer.value_model.parameters())
    assert sum(storages.values()) - trainable <= base_numel and head == policy.config.hidden_size + 1
    before = trainer.value_model.summary.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.value_model.summary.weight)  # the critic trained


@pytest.mark.parametrize(
    ("launch_env", "keys", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, r"^ppo: PPO runs sharded under FSDP2 only"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            {},
            r"^ppo: PPO does not run under DeepSpeed ZeRO-3 .*fsdp.yaml",
        ),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            {"use_peft": True},
            r"^use_peft: LoRA PPO does not run under FSDP .*ddp.yaml",
        ),
    ],
    ids=["fsdp1", "zero3", "lora-fsdp2"],
)
def test_ppo_sharded_launches_it_cannot_run_are_refused_before_loading(
    tiny_checkpoint, tmp_path, monkeypatch, launch_env, keys, message
):
    # What `accelerate launch --config_file accelerate_configs/<config>.yaml` sets for the stage.
    for key, value in launch_env.items():
        monkeypatch.setenv(key, value)
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:prompts",
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        output_dir=str(tmp_path / "out"),
        **keys,
    )
    with pytest.raises(RecipeError, match=message):
        ppo.parse([str(recipe)])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (bf16: true is refused here)")
def test_bf16_on_a_cpu_with_native_bf16_autocasts_generation_scoring_and_training(
    tiny_checkpoint: Path, tmp_path: Path
):
    trainer = _tiny_trainer(tiny_checkpoint, tmp_path / "out", bf16=True)
    autocast = []  # per policy forward: was bf16 autocast on, and did it need gradients (training)?
    trainer.policy.register_forward_hook(
        lambda _m, _a, _o: autocast.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
    )
    trainer.train()
    assert {grad for _, grad in autocast} == {False, True}  # generation and scoring, then training
    assert all(enabled for enabled, _ in autocast), autocast
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32


def test_a_shared_value_head_rollout_runs_the_policy_once_per_batch_with_the_same_numbers(
    tiny_sft_checkpoint: Path,
):
    # The rollout takes log-probs and values from one policy pass when the critic is a shared head: the same
    # numbers, bit for bit, as the separate passes (`response_logprobs`, `token_values`) it replaced.
    from rlhf.logprobs import response_forward, response_logprobs, token_logprobs
    from rlhf.ppo.models import shared_head_forward

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint).eval()
    head = ValueHead.for_policy(policy)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, 9, 10]])
    mask = (ids != 0).long()
    with torch.no_grad():
        calls = []
        hook = policy.register_forward_hook(lambda *_: calls.append(1))
        logits, values = shared_head_forward(policy, head, ids, mask, 3)
        logprobs, logits = token_logprobs(logits, ids[:, 3:], temperature=0.7)
        assert len(calls) == 1
        hook.remove()
        separate_logprobs, separate_logits = response_logprobs(policy, ids, mask, 3, temperature=0.7)
        assert torch.equal(logprobs, separate_logprobs) and torch.equal(logits, separate_logits)
        separate_values = head(response_forward(policy, ids, mask, 3, hidden=True).hidden_states[-1][:, 2:-1])
        assert torch.equal(values, separate_values)
