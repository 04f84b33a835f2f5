"""Health alarms (rlhf.health + rlhf.callbacks.HealthCallback), each provoked by a real tiny run.

- reward hacking: GRPO in the spirit of the README's hacking setting (the reward model weighs in alone,
  a small KL penalty, a high learning rate): the reward model's score rises while the world's rule,
  held out at weight 0, falls; with `health_actions: {reward_hacking: stop}` the run ends with one
  line and keeps the checkpoint before the alarm.
- KL blow-up: GRPO with a negligible KL penalty and a high learning rate.
- DPO chosen-reward collapse: plain sigmoid DPO at a high learning rate pushes both answers down.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlhf.artifacts import incomplete_dir, read_metrics
from rlhf.config import RecipeError
from rlhf.data.synthetic import classify_prompt, make_synthetic_dataset
from rlhf.entrypoint import run
from rlhf.health import HealthPoint, HealthRules
from rlhf.stages import dpo, grpo
from tests.conftest import FAST_TRAINING, write_recipe

ONLINE = {
    **FAST_TRAINING,
    "num_generations": 4,
    "per_device_train_batch_size": 16,
    "max_completion_length": 16,
    "temperature": 1.0,
    "logging_steps": 1,
}


def _alarms(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("health alarm")]


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
    # Harmful requests and greetings: the test reward model scores "Here is how to ..." highest for every
    # prompt, so a policy chasing it stops refusing and greeting, which the world's rule marks wrong.
    prompts = make_synthetic_dataset("prompts", 256, seed=0, split="train")
    prompts = prompts.filter(lambda r: classify_prompt(r["prompt"][0]["content"]) in ("harmful", "greeting"))
    prompts.to_json(tmp_path / "prompts.jsonl")
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
        dataset_name=str(tmp_path / "prompts.jsonl"),
        **{**ONLINE, "save_strategy": "steps"},
    )
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit):
        run(grpo.main, [str(recipe)])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "health alarm reward_hacking at step" in line and "held-out judge fell" in line, line
    kept = incomplete_dir(out)
    step = int(line.split("at step ")[1].split(" ")[0])
    checkpoints = sorted(int(p.name.split("-")[1]) for p in kept.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] < step and f"checkpoint-{checkpoints[-1]}" in line, (checkpoints, line)
    assert not out.exists()  # nothing published
    (event,) = json.loads((kept / "health_events.json").read_text())
    assert event["alarm"] == "reward_hacking" and event["action"] == "stop"


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
