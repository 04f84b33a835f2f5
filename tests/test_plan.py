"""`rlhf plan`: per-device memory from a recipe and an accelerate config, sized on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from rlhf.config import RecipeError
from rlhf.plan import parse_memory_size, plan_recipe, read_accelerate_config
from tests.conftest import write_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"


@pytest.fixture()
def recipes(tiny_checkpoint: Path, tmp_path: Path) -> dict[str, Path]:
    common = {"model_name_or_path": str(tiny_checkpoint), "per_device_train_batch_size": 4, "report_to": "none"}
    return {
        "sft": write_recipe(
            tmp_path / "sft.yaml",
            stage="sft",
            dataset_name="synthetic:sft",
            max_length=64,
            output_dir=str(tmp_path / "sft"),
            **common,
        ),
        "ppo": write_recipe(
            tmp_path / "ppo.yaml",
            stage="ppo",
            dataset_name="synthetic:prompts",
            reward_model_path=str(tiny_checkpoint),
            response_length=16,
            output_dir=str(tmp_path / "ppo"),
            **common,
        ),
    }


def _config(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of a shipped accelerate config with some keys changed."""
    values = yaml.safe_load((CONFIGS / name).read_text())
    values.update(changes)
    path = tmp_path / f"changed-{name}"
    path.write_text(yaml.safe_dump(values))
    return path


def test_tiny_checkpoint_counts_come_from_the_meta_model(recipes, tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    plan = plan_recipe([str(recipes["ppo"])], prompt_length=32)
    roles = {m.role: m for m in plan.models}
    assert set(roles) == {"policy", "value model", "reference", "reward model"}  # registry: 2 trained, 2 frozen
    real = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert roles["policy"].parameters == real.num_parameters()
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1)
    assert roles["value model"].parameters == classifier.num_parameters()
    assert plan.workload.seq_len == 32 + 16 and plan.workload.batch == 4
    # fp32 on CPU: the policy's weights are 4 bytes a parameter, its AdamW state 8 (policy + value model)
    peak = plan.moments["optimizer step"]
    assert peak["policy weights"] == roles["policy"].parameters * 4
    trained = roles["policy"].parameters + roles["value model"].parameters
    assert peak["optimizer state"] == trained * 8
    assert "KV cache (rollout generation)" in plan.moments["rollout generation"]
    assert plan.total == int(max(sum(moment.values()) for moment in plan.moments.values()))


def test_fsdp2_on_n_processes_holds_one_nth_of_the_sharded_state(recipes, tmp_path):
    fsdp = str(_config(tmp_path, "fsdp.yaml", mixed_precision="no"))
    one, eight = (plan_recipe([str(recipes["sft"])], fsdp, n) for n in (1, 8))
    assert one.parallelism.strategy == eight.parallelism.strategy == "fsdp2"
    for moment, item in (("optimizer step", "optimizer state"), ("optimizer step", "gradients")):
        assert one.moments[moment][item] == pytest.approx(8 * eight.moments[moment][item])
    assert one.moments["optimizer step"]["model weights"] == pytest.approx(
        8 * eight.moments["optimizer step"]["model weights"]
    )
    # DDP keeps everything whole on every process (and copies the gradients into its buckets)
    ddp = plan_recipe([str(recipes["sft"])], str(_config(tmp_path, "ddp.yaml", mixed_precision="no")), 8)
    assert ddp.moments["optimizer step"]["optimizer state"] == one.moments["optimizer step"]["optimizer state"]
    assert "DDP gradient buckets" in ddp.peak


def test_zero3_and_offload_move_state_off_the_device(recipes, tmp_path):
    zero3 = plan_recipe([str(recipes["sft"])], str(CONFIGS / "zero3.yaml"), 8)
    zero2 = plan_recipe([str(recipes["sft"])], str(CONFIGS / "zero2.yaml"), 8)
    assert zero3.parallelism.strategy == "zero3" and zero2.parallelism.strategy == "zero2"
    assert zero3.moments["optimizer step"]["model weights"] < zero2.moments["optimizer step"]["model weights"]
    offload = _config(tmp_path, "zero3.yaml", deepspeed_config={"zero_stage": 3, "offload_optimizer_device": "cpu"})
    offloaded = plan_recipe([str(recipes["sft"])], str(offload), 8)
    assert "optimizer state" in offloaded.host and "optimizer state" not in offloaded.peak


def test_a_deepspeed_json_named_by_the_config_is_read(recipes, tmp_path, monkeypatch):
    # accelerate_configs/zero3_cpu.yaml names zero3_cpu.json (stage 3, nothing offloaded) from the repository root
    monkeypatch.chdir(tmp_path)  # found beside the config's folder too, wherever the planner runs
    shipped = plan_recipe([str(recipes["sft"])], str(CONFIGS / "zero3_cpu.yaml"))
    assert shipped.parallelism.strategy == "zero3" and shipped.parallelism.num_processes == 2
    assert not shipped.parallelism.offload_optimizer and not shipped.parallelism.offload_params
    offload = tmp_path / "offload.json"
    offload.write_text('{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}')
    config = _config(tmp_path, "zero3.yaml", deepspeed_config={"deepspeed_config_file": str(offload)})
    assert read_accelerate_config(str(config)).offload_params
    missing = _config(tmp_path, "zero3.yaml", deepspeed_config={"deepspeed_config_file": "nowhere.json"})
    with pytest.raises(RecipeError, match="nowhere.json.*does not exist"):
        read_accelerate_config(str(missing))
    (tmp_path / "broken.json").write_text('{"zero_optimization": ')
    broken = _config(tmp_path, "zero3.yaml", deepspeed_config={"deepspeed_config_file": str(tmp_path / "broken.json")})
    with pytest.raises(RecipeError, match="broken.json .*is not a DeepSpeed JSON config"):
        read_accelerate_config(str(broken))


def test_lora_predicts_less_than_full_fine_tuning(recipes):
    full = plan_recipe([str(recipes["ppo"])], prompt_length=32)
    lora = plan_recipe([str(recipes["ppo"]), "--use_peft", "true", "--lora_r", "4"], prompt_length=32)
    policy = next(m for m in lora.models if m.role == "policy")
    assert policy.lora and 0 < policy.trainable < policy.parameters / 5  # counted by peft on the meta model
    assert "reference" not in {m.role for m in lora.models}  # the policy with adapters off is the reference
    assert lora.total < full.total


def test_a_shared_value_head_plans_no_second_backbone(recipes):
    separate = plan_recipe([str(recipes["ppo"])], prompt_length=32)
    shared = plan_recipe([str(recipes["ppo"]), "--value_model_path", "shared"], prompt_length=32)
    assert "value model" in {m.role for m in separate.models}
    assert "value model" not in {m.role for m in shared.models}
    assert shared.total < separate.total
    # A LoRA policy gets a shared head unless value_model_path names a checkpoint, as the stage decides.
    lora = plan_recipe([str(recipes["ppo"]), "--use_peft", "true"], prompt_length=32)
    assert "value model" not in {m.role for m in lora.models}
    value = next(m for m in separate.models if m.role == "value model").path
    lora_critic = plan_recipe(
        [str(recipes["ppo"]), "--use_peft", "true", "--value_model_path", value], prompt_length=32
    )
    assert "value model" in {m.role for m in lora_critic.models}


def test_ppo_under_fsdp_shards_the_frozen_models_and_gathers_the_policy_for_rollouts(recipes):
    ddp = plan_recipe([str(recipes["ppo"])], str(CONFIGS / "ddp.yaml"), 8, prompt_length=32)
    fsdp = plan_recipe([str(recipes["ppo"])], str(CONFIGS / "fsdp.yaml"), 8, prompt_length=32)
    for frozen in ("reference weights", "reward model weights"):
        assert fsdp.moments["forward/backward"][frozen] == pytest.approx(ddp.moments["forward/backward"][frozen] / 8)
    gathered = fsdp.moments["rollout generation"]["whole policy + value weights (gathered for the rollout)"]
    trained = [m for m in fsdp.models if m.trained]
    assert gathered == sum(m.parameters * m.weight_bytes for m in trained)


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("zero3.yaml", [], "PPO does not run under DeepSpeed ZeRO-3"),
        ("fsdp.yaml", ["--use_peft", "true"], "use_peft: LoRA PPO does not run under FSDP"),
    ],
)
def test_plan_refuses_the_ppo_setups_the_stage_refuses(recipes, config, overrides, message):
    with pytest.raises(RecipeError, match=message):
        plan_recipe([str(recipes["ppo"]), *overrides], str(CONFIGS / config), 8, prompt_length=32)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{recipe}", "--device-memory", "eighty"], "--device-memory: got 'eighty'"),
        (["{recipe}", "--device-memory", "80"], "give a positive size with a unit"),
        (["{missing}"], "not found"),
        (
            ["{recipe}", "--config", "accelerate_configs/nope.yaml"],
            "--config: 'accelerate_configs/nope.yaml' not found",
        ),
        (["{recipe}", "--config", "{xla}"], "distributed_type 'XLA'"),
        (["{recipe}", "--num-processes", "0"], "--num-processes: got 0"),
        (["{recipe}", "--per_device_train_batch_sise", "4"], "Did you mean `per_device_train_batch_size`"),
    ],
)
def test_bad_input_is_one_error_line(recipes, tmp_path, capsys, argv, message):
    xla = tmp_path / "xla.yaml"
    xla.write_text("distributed_type: XLA\nnum_processes: 8\n")
    names = {"recipe": str(recipes["sft"]), "missing": str(tmp_path / "missing.yaml"), "xla": str(xla)}
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *(arg.format(**names) for arg in argv)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_memory_sizes():
    assert parse_memory_size("80GB") == 80 * 10**9
    assert parse_memory_size("24 GiB") == 24 * 2**30
    assert parse_memory_size("512mb") == 512 * 10**6
    with pytest.raises(RecipeError, match="--device-memory"):
        parse_memory_size("-3GB")


def test_configs_are_read_as_accelerate_would_launch_them():
    assert read_accelerate_config(str(CONFIGS / "cpu.yaml")).strategy == "single"
    ddp = read_accelerate_config(str(CONFIGS / "ddp.yaml"), 4)
    assert (ddp.strategy, ddp.num_processes, ddp.device) == ("ddp", 4, "gpu")
    assert read_accelerate_config(str(CONFIGS / "fsdp.yaml")).num_processes == 8
    assert read_accelerate_config(str(CONFIGS / "multi_node.yaml")).num_processes == 16


def test_cli_prints_a_verdict(recipes, capsys):
    main(["plan", str(recipes["sft"]), "--device-memory", "64GB"])
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("verdict:"))
    assert verdict.startswith("verdict: fits") and "largest:" in verdict
    main(["plan", str(recipes["sft"]), "--device-memory", "1MB"])
    assert "verdict: does not fit" in capsys.readouterr().out
    main(["plan", str(recipes["ppo"]), "--json", "--prompt-length", "16"])
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == "ppo" and report["total_bytes"] > 0 and report["fits"] is not None
