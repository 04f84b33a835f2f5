"""Health alarms (rlhf.health + rlhf.callbacks.HealthCallback), each provoked by a real tiny run.

- reward hacking: GRPO in the spirit of the README's hacking setting (the reward model weighs in alone,
  a small KL penalty, a high learning rate): the reward model's score rises while the world's rule,
  held out at weight 0, falls; with `health_actions: {reward_hacking: stop}` the run ends with one
  line and keeps the checkpoint before the alarm.
- KL blow-up: GRPO with a negligible KL penalty and a high learning rate.
- DPO chosen-reward collapse: plain sigmoid DPO at a high learning rate pushes both answers down.
- DPO margin runaway: the same fast DPO drives the chosen-rejected margin past max_reward_margin.
- PPO, whose own loop calls the same callbacks: a KL blow-up (no KL penalty, a high learning rate)
  warns, and reward hacking (the reward model alone optimised, the rule at weight 0 as the judge)
  stops the run like GRPO's.
- Length runaway: GRPO rewarded by its completions' length (`reward_longer_answers`, defined here) at
  a high learning rate; the mean length passes max_response_length_ratio × the first logged one, and
  with `health_actions: {length_runaway: stop}` the run ends with one line and keeps the checkpoint
  before the alarm.
- Length collapse: GRPO rewarded for short completions (`reward_shorter_answers`: an immediate EOS
  scores best); the mean length falls below min_response_length_ratio × the first logged one.
- Entropy collapse: the same reward, faster, longer and in groups of 8: every completion becomes the
  one fixed (empty) answer, the policy turns deterministic and its logged per-token entropy falls from
  its start below min_entropy.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState

from rlhf.artifacts import incomplete_dir, read_metrics
from rlhf.callbacks import HealthCallback
from rlhf.config import RecipeError
from rlhf.data.synthetic import classify_prompt, make_synthetic_dataset
from rlhf.entrypoint import run
from rlhf.health import HealthPoint, HealthRules
from rlhf.ppo import PPOConfig
from rlhf.stages import dpo, grpo, ppo
from tests.conftest import FAST_TRAINING, write_recipe

ONLINE = {
    **FAST_TRAINING,
    "num_generations": 4,
    "per_device_train_batch_size": 16,
    "max_completion_length": 16,
    "temperature": 1.0,
    "logging_steps": 1,
}


# PPO's short runs: one update per log, fp32 CPU, no evaluation (the alarms read the training logs).
PPO_ONLINE = {
    **FAST_TRAINING,
    "logging_steps": 1,
    "max_eval_samples": 0,
    "temperature": 1.0,
    "lr_scheduler_type": "constant",
    "value_model_path": "shared",  # a value head on the policy: one backbone, a quicker update
}


# Reward functions for the length and entropy alarms (TRL passes each completion's token ids).
def reward_longer_answers(prompts: list, completions: list, completion_ids: list[list[int]], **kwargs) -> list[float]:
    return [float(len(ids)) for ids in completion_ids]


def reward_shorter_answers(prompts: list, completions: list, completion_ids: list[list[int]], **kwargs) -> list[float]:
    return [-float(len(ids)) for ids in completion_ids]


def _alarms(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("health alarm")]


def _harmful_and_greeting_prompts(tmp_path: Path) -> Path:
    """Harmful requests and greetings: the test reward model scores "Here is how: ..." highest for every
    prompt, so a policy chasing it stops refusing and greeting, which the world's rule marks wrong."""
    prompts = make_synthetic_dataset("prompts", 256, seed=0, split="train")
    prompts = prompts.filter(lambda r: classify_prompt(r["prompt"][0]["content"]) in ("harmful", "greeting"))
    prompts.to_json(tmp_path / "prompts.jsonl")
    return tmp_path / "prompts.jsonl"


def _logged(out: Path, key: str) -> dict[int, float]:
    """A published run's logged `key` by step (from trainer_state.json's log history)."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h[key] for h in history if key in h}


def _error_line_of_stopped_run(
    main, recipe: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> str:
    """Run a stage the way its command does; it must end with SystemExit and exactly one `error:` line."""
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit):
        run(main, [str(recipe)])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    return line


def _stopped_by(line: str, alarm: str, out: Path) -> None:
    """The run ended with one line naming the alarm and the last checkpoint from before it; nothing published."""
    assert f"health alarm {alarm} at step" in line, line
    kept = incomplete_dir(out)
    step = int(line.split("at step ")[1].split(" ")[0])
    checkpoints = sorted(int(p.name.split("-")[1]) for p in kept.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] < step and f"checkpoint-{checkpoints[-1]}" in line, (checkpoints, line)
    assert not out.exists()  # nothing published
    (event,) = json.loads((kept / "health_events.json").read_text())
    assert event["alarm"] == alarm and event["action"] == "stop"


# ---- the rules on hand-made numbers (no model) ---------------------------------------------------


def test_rules_need_a_trend_not_one_noisy_log():
    rules = HealthRules(reward_hacking_judge_drop=0.15, window=2)
    # The judge dips once while the proxy rises: one noisy log is not a trend (window means 0.5, 0.4, 0.4).
    for step, (proxy, judge) in enumerate([(0.0, 0.5), (0.1, 0.5), (0.2, 0.3), (0.3, 0.5)]):
        assert rules.check(HealthPoint(step, proxy=proxy, judge=judge)) == []
    # Two low logs in a row while the proxy keeps rising: the judge's window mean fell 0.2 below its best.
    ((name, message),) = rules.check(HealthPoint(4, proxy=0.5, judge=0.1))
    assert name == "reward_hacking" and "fell 0.500 → 0.300" in message, message


def test_length_and_entropy_rules():
    rules = HealthRules(max_response_length_ratio=2.0, min_response_length_ratio=0.5, min_entropy=0.1)
    assert rules.check(HealthPoint(1, length=10.0, entropy=1.0)) == []
    assert [name for name, _ in rules.check(HealthPoint(2, length=25.0, entropy=0.05))] == [
        "length_runaway",
        "entropy_collapse",
    ]
    assert [name for name, _ in rules.check(HealthPoint(3, length=4.0))] == ["length_collapse"]


def test_the_alarms_state_survives_a_checkpoint_as_json():
    # What PPO's ppo_state.json keeps: the first logged length, the trend history and the events so far.
    args = PPOConfig(
        output_dir="unused",
        max_kl=1.0,
        max_response_length_ratio=2.0,
        health_window=1,
        reward_model_path="outputs/reward",
    )
    callback = HealthCallback(args)
    first = {"objective/kl": 0.1, "response_length/mean": 10.0, "reward/reward_model": 0.0, "reward/rule_reward": 1.0}
    for step, logs in enumerate([first, {**first, "objective/kl": 2.0}], start=1):
        callback.on_log(args, TrainerState(global_step=step), TrainerControl(), logs=logs)
    restored = HealthCallback(args)
    restored.load_state_dict(json.loads(json.dumps(callback.state_dict())))
    assert restored.health_events == callback.health_events and restored.firing == {"kl"}
    # 25 tokens is 2.5× the first logged 10; the judge fell from 1.0 while the reward model's score rose.
    alarms = restored.rules.check(HealthPoint(3, length=25.0, proxy=0.5, judge=0.5))
    assert [name for name, _ in alarms] == ["length_runaway", "reward_hacking"], alarms

    # A checkpoint of rlhf's earlier PPO health monitor resumes too: its first length, its events as alarms.
    earlier = HealthCallback(args)
    problems = ["KL to the reference 9.000 > max_kl 5.0", "per-token entropy 0.010 < min_entropy 0.1"]
    earlier.load_state_dict(
        {"initial_response_length": 4.0, "events": [{"step": 2, "problems": problems, "action": "warn"}]}
    )
    assert earlier.rules.initial_length == 4.0
    assert [(e["step"], e["alarm"]) for e in earlier.health_events] == [(2, "kl"), (2, "entropy_collapse")]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"health_actions": {"hacking": "stop"}}, "health_actions: no alarm named 'hacking'"),
        ({"health_actions": {"kl": "halt"}}, "health_actions: kl: got 'halt'"),
        ({"health_action": "halt"}, "health_action: got 'halt'"),
        ({"max_kl": 0.5, "beta": 0.0}, "max_kl: 0.5 needs beta > 0"),
        ({"health_window": 0}, "health_window: got 0"),
        ({"reward_hacking_judge": "rlhf.data.synthetic:no_such_judge"}, "reward_hacking_judge: .* no function"),
    ],
)
def test_bad_health_keys_fail_before_the_model_loads(tiny_checkpoint: Path, tmp_path: Path, keys, message):
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_checkpoint),
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        dataset_name="synthetic:prompts",
        output_dir=str(out),
        **keys,
    )
    with pytest.raises(RecipeError, match=message):
        grpo.main([str(recipe)])
    assert not incomplete_dir(out).exists() and not out.exists()


# ---- provoked for real -------------------------------------------------------------------------


def test_reward_hacking_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    tiny_sft_checkpoint: Path,
    tiny_reward_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
):
    prompts = _harmful_and_greeting_prompts(tmp_path)
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_model_path=str(tiny_reward_checkpoint),
        reward_min_accuracy=0.6,
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        # Only the reward model is optimised; the rule, at weight 0, is logged as the held-out judge.
        reward_weights=[1.0, 0.0],
        beta=0.02,
        learning_rate=1e-3,
        max_steps=12,
        save_steps=2,
        health_actions={"reward_hacking": "stop"},
        output_dir=str(out),
        dataset_name=str(prompts),
        **{**ONLINE, "save_strategy": "steps"},
    )
    line = _error_line_of_stopped_run(grpo.main, recipe, capsys, caplog)
    assert "held-out judge fell" in line, line
    _stopped_by(line, "reward_hacking", out)


def test_kl_blow_up_warns_and_is_listed_in_metrics(tiny_sft_checkpoint: Path, tmp_path: Path, caplog):
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        dataset_name="synthetic:prompts",
        synthetic_num_examples=64,
        beta=1e-4,  # a negligible penalty: TRL still computes the KL, so it can be watched
        learning_rate=1e-2,
        max_steps=3,
        max_kl=0.5,
        output_dir=str(out),
        **ONLINE,
    )
    with caplog.at_level(logging.WARNING):
        grpo.main([str(recipe)])
    assert any("health alarm kl" in message for message in _alarms(caplog)), _alarms(caplog)
    events = read_metrics(out)["health_events"]
    assert events[0]["alarm"] == "kl" and events[0]["action"] == "warn", events


def test_dpo_chosen_reward_collapse_warns(tiny_sft_checkpoint: Path, tmp_path: Path, caplog):
    out = tmp_path / "dpo"
    recipe = write_recipe(
        tmp_path / "dpo.yaml",
        stage="dpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        dataset_name="synthetic:preference",
        synthetic_num_examples=256,
        clean_deduplicate=False,
        max_length=96,
        beta=0.1,
        # Plain DPO (sigmoid loss only) this fast pushes the chosen answers down with the rejected ones.
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        max_steps=12,
        max_eval_samples=8,
        output_dir=str(out),
        **{**FAST_TRAINING, "per_device_train_batch_size": 8, "logging_steps": 2},
    )
    with caplog.at_level(logging.WARNING):
        dpo.main([str(recipe)])
    assert any("health alarm chosen_collapse" in message for message in _alarms(caplog)), _alarms(caplog)
    events = read_metrics(out)["health_events"]
    assert [e["alarm"] for e in events] == ["chosen_collapse"], events


def test_dpo_margin_runaway_warns(tiny_sft_checkpoint: Path, tmp_path: Path, caplog):
    out = tmp_path / "dpo"
    recipe = write_recipe(
        tmp_path / "dpo.yaml",
        stage="dpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        dataset_name="synthetic:preference",
        synthetic_num_examples=128,
        clean_deduplicate=False,
        max_length=96,
        beta=0.1,
        learning_rate=1e-2,  # fast enough to drive the margins (≈2–3 by step 6) far past the limit
        lr_scheduler_type="constant",
        max_steps=8,
        max_eval_samples=8,
        max_reward_margin=1.0,
        min_chosen_reward=None,
        output_dir=str(out),
        **{**FAST_TRAINING, "per_device_train_batch_size": 8, "logging_steps": 1},
    )
    with caplog.at_level(logging.WARNING):
        dpo.main([str(recipe)])
    events = read_metrics(out)["health_events"]
    assert {e["alarm"] for e in events} == {"margin_runaway"} and events[0]["action"] == "warn", events
    assert "max_reward_margin 1" in events[0]["message"]


def test_ppo_kl_blow_up_warns_and_is_listed_in_metrics(tiny_sft_checkpoint: Path, tmp_path: Path, caplog):
    out = tmp_path / "ppo"
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        dataset_name="synthetic:prompts",
        synthetic_num_examples=64,
        response_length=8,
        num_ppo_epochs=2,
        kl_coef=0.0,  # no penalty: nothing holds the policy near the reference
        learning_rate=1e-2,
        max_steps=3,
        max_kl=2.0,  # PPO's KL is per sequence
        output_dir=str(out),
        **PPO_ONLINE,
    )
    with caplog.at_level(logging.WARNING):
        ppo.main([str(recipe)])
    assert any("health alarm kl" in message for message in _alarms(caplog)), _alarms(caplog)
    events = read_metrics(out)["health_events"]
    assert events[0]["alarm"] == "kl" and events[0]["action"] == "warn", events
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[0]["health/ok"] == 1 and history[events[0]["step"] - 1]["health/ok"] == 0


def test_ppo_reward_hacking_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    tiny_sft_checkpoint: Path,
    tiny_reward_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
):
    out = tmp_path / "ppo"
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_model_path=str(tiny_reward_checkpoint),
        reward_min_accuracy=0.6,
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        # Only the reward model is optimised; the rule, at weight 0, is logged as the held-out judge.
        reward_weights=[1.0, 0.0],
        dataset_name=str(_harmful_and_greeting_prompts(tmp_path)),
        response_length=10,
        num_ppo_epochs=4,
        kl_coef=0.0,
        learning_rate=5e-3,
        max_steps=12,
        save_steps=3,
        health_actions={"reward_hacking": "stop"},
        # At this learning rate the run is chaotic: this seed and optimizer give a run known to hack within 12 updates
        # (the fused AdamW, PPO's default, rounds differently and its run has not hacked by update 12).
        optim="adamw_torch",
        output_dir=str(out),
        **{**PPO_ONLINE, "per_device_train_batch_size": 16, "save_strategy": "steps"},
    )
    line = _error_line_of_stopped_run(ppo.main, recipe, capsys, caplog)
    assert "held-out judge fell" in line, line
    _stopped_by(line, "reward_hacking", out)


def test_length_runaway_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    tiny_sft_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_funcs=["tests.test_health:reward_longer_answers"],  # the longer the completion, the better
        dataset_name="synthetic:prompts",
        synthetic_num_examples=64,
        learning_rate=3e-3,
        max_steps=10,  # the alarm comes at step 3-5; the stop ends the run there
        save_steps=1,
        max_response_length_ratio=2.0,
        health_actions={"length_runaway": "stop"},
        output_dir=str(out),
        # Room to grow: the SFT model's answers start at ~9-13 tokens, so 64 allows ~5× the start.
        **{**ONLINE, "max_completion_length": 64, "save_strategy": "steps"},
    )
    line = _error_line_of_stopped_run(grpo.main, recipe, capsys, caplog)
    assert "max_response_length_ratio 2)" in line, line
    _stopped_by(line, "length_runaway", out)
    # The length grew during training: the logged length at the alarm is over twice the first logged one.
    (event,) = json.loads((incomplete_dir(out) / "health_events.json").read_text())
    now, ratio, first = re.search(
        r"length ([\d.]+) is ([\d.]+)× the first logged \(([\d.]+);", event["message"]
    ).groups()
    assert float(ratio) > 2.0 and float(now) > 2 * float(first) and event["step"] > 1, event


def test_length_collapse_warns_and_is_listed_in_metrics(tiny_sft_checkpoint: Path, tmp_path: Path, caplog):
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_funcs=["tests.test_health:reward_shorter_answers"],  # the shorter, the better: EOS at once wins
        dataset_name="synthetic:prompts",
        synthetic_num_examples=64,
        learning_rate=3e-3,
        max_steps=10,  # the alarm comes at step 4-5; the length ends at 1-2 tokens (from ~10-12)
        min_response_length_ratio=0.5,
        output_dir=str(out),
        **ONLINE,
    )
    with caplog.at_level(logging.WARNING):
        grpo.main([str(recipe)])
    assert any("health alarm length_collapse" in message for message in _alarms(caplog)), _alarms(caplog)
    events = read_metrics(out)["health_events"]
    assert [e["alarm"] for e in events] == ["length_collapse"] and events[0]["action"] == "warn", events
    lengths = _logged(out, "completions/mean_length")
    assert lengths[events[0]["step"]] < 0.5 * lengths[1], (lengths, events)


def test_entropy_collapse_warns_after_the_entropy_falls(tiny_sft_checkpoint: Path, tmp_path: Path, caplog):
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        # One fixed answer scores best (the empty one, EOS at once); fast enough that the policy turns
        # deterministic: once every sample is that answer, the entropy is what sharpening left behind.
        reward_funcs=["tests.test_health:reward_shorter_answers"],
        dataset_name="synthetic:prompts",
        synthetic_num_examples=64,
        learning_rate=5e-3,
        max_steps=16,  # the entropy first falls below min_entropy at step 6-10
        min_entropy=0.15,  # the SFT model starts at ~0.5-0.8 nats per token
        min_response_length_ratio=None,  # the length collapses too; this test watches the entropy alone
        output_dir=str(out),
        # Groups of 8: a rare non-empty sample still shows up, so the policy keeps sharpening after most
        # samples are already empty (with groups of 4 it stalls sooner, as every group scores alike).
        **{**ONLINE, "num_generations": 8, "per_device_train_batch_size": 32},
    )
    with caplog.at_level(logging.WARNING):
        grpo.main([str(recipe)])
    assert any("health alarm entropy_collapse" in message for message in _alarms(caplog)), _alarms(caplog)
    events = read_metrics(out)["health_events"]
    assert {e["alarm"] for e in events} == {"entropy_collapse"} and events[0]["action"] == "warn", events
    # The entropy fell for real: healthy at the first log, below min_entropy only later in training.
    entropy = _logged(out, "entropy")
    step = events[0]["step"]
    assert step > 1 and entropy[1] > 2 * 0.15 and entropy[step] < 0.15 < entropy[1], (entropy, events)
