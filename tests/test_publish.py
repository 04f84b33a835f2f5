"""Model card and Hub upload, against a local stand-in for the Hub (no network)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from rlhf.config import RecipeError
from rlhf.model_card import build_model_card, lineage
from rlhf.publish import files_to_upload, main, publish_if_requested
from tests.conftest import FAST_TRAINING, write_recipe
from tests.hub_server import FakeHub


def _online(monkeypatch: pytest.MonkeyPatch, endpoint: str | None = None) -> None:
    """Undo conftest's HF_HUB_OFFLINE=1 for this test: huggingface_hub read it into constants at import."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # HfApi() reads it when created


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pushed_stage(tiny_checkpoint: Path, tmp_path_factory):
    """A real LoRA SFT stage run whose recipe sets push_to_hub; returns (output dir, the fake Hub it pushed to)."""
    from rlhf.stages import sft

    out = tmp_path_factory.mktemp("pushed") / "sft-lora"
    recipe = write_recipe(
        out.parent / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        synthetic_num_examples=48,
        max_eval_samples=4,
        clean_deduplicate=False,
        assistant_only_loss=True,
        max_length=64,
        max_steps=4,
        learning_rate=1e-2,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        output_dir=str(out),
        push_to_hub=True,
        hub_model_id="me/tiny-sft-lora",
        hub_token="secret-token",
        **{**FAST_TRAINING, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1},
    )
    with pytest.MonkeyPatch.context() as monkeypatch, FakeHub() as hub:
        _online(monkeypatch, hub.url)
        sft.main([str(recipe)])
    return out, hub


def test_stage_push_to_hub_uploads_the_finished_output_once(pushed_stage):
    out, hub = pushed_stage
    # The Trainer would have created the repo at start-up and committed each of the 2 checkpoints.
    assert [c["repo_id"] for c in hub.commits] == ["me/tiny-sft-lora"]
    uploaded = hub.files["me/tiny-sft-lora"]
    assert set(uploaded) == set(files_to_upload(out))
    # LoRA adapters are merged on save: the output is a plain checkpoint.
    assert {"model.safetensors", "config.json", "README.md", "recipe.yaml"} <= set(uploaded)
    assert all(uploaded[name] == (out / name).read_bytes() for name in uploaded)
    assert not any(name.startswith("checkpoint-") or name.endswith(".bin") for name in uploaded)
    # The token authenticates the upload but never lands in a file.
    writes = [headers for method, _, headers in hub.requests if method == "POST"]
    assert writes and all(headers.get("authorization") == "Bearer secret-token" for headers in writes)
    assert not any(b"secret-token" in data for data in uploaded.values())


# What lands in output folders besides the model: keys, credentials, pickles, training state, other runs.
UNTRUSTED_FILES = (
    ".env",
    "id_rsa",
    "id_ed25519",
    ".netrc",
    ".ssh/config",
    ".huggingface_token",
    "wandb/settings",
    "secrets.yaml",
    "pytorch_model.bin",
    "optimizer.bin",
    "optimizer.pt",
    "training_args.bin",
    "checkpoint-4/rng_state.pth",
    "runs/checkpoint-20/model.safetensors",
    "runs/checkpoint-20/config.json",
)


def test_publish_uploads_only_model_files_and_lists_what_it_skipped(pushed_stage, tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    stage, _ = pushed_stage
    out = tmp_path / "stage"
    shutil.copytree(stage, out)
    (out / "eval.json").write_text(json.dumps({"rule_reward": 0.75, "win_rate": 0.6, "note": "text is skipped"}))
    for name in UNTRUSTED_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"hf_UNTRUSTED")
    # An older pipeline wrote the recipe's token into lineage.json: uploaded redacted, left as it is here.
    old_lineage = {"stage": "sft", "what": {"recipe": {"hub_token": "hf_OLDTOKEN", "max_steps": 4}}}
    (out / "lineage.json").write_text(json.dumps(old_lineage))

    _online(monkeypatch)
    with FakeHub() as hub:
        files = main([str(out), "--repo-id", "me/tiny", "--token", "t0k", "--endpoint", hub.url, "--private"])
    assert hub.repos["me/tiny"]["visibility"] == "private"
    local = _digests(out)
    uploaded = hub.files["me/tiny"]
    plots = {name for name in local if name.startswith("plots/") and name.endswith(".png")}
    model_files = {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    records = {"README.md", "recipe.yaml", "metrics.json", "eval.json", "lineage.json", "chat_template.jinja"}
    assert plots and set(uploaded) == set(files) == model_files | records | plots
    assert not any(b"hf_UNTRUSTED" in data or b"hf_OLDTOKEN" in data for data in uploaded.values())
    assert json.loads(uploaded["lineage.json"])["what"]["recipe"] == {"hub_token": "<redacted>", "max_steps": 4}
    assert json.loads((out / "lineage.json").read_text()) == old_lineage
    assert all(
        hashlib.sha256(data).hexdigest() == local[name] for name, data in uploaded.items() if name != "lineage.json"
    )
    skipped = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(rf"skipped {len(local) - len(uploaded)} files not on the publish allow-list: ", skipped)
    for shown in (".env", "id_rsa", ".ssh/", "wandb/", "pytorch_model.bin", "runs/ (2 files)", "trainer_state.json"):
        assert shown in skipped

    card = ModelCard.load(out / "README.md")
    assert {"rlhf", "trl", "sft"} <= set(card.data.tags)  # LoRA merged on save: no peft needed to load it
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers"
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("rule_reward", 0.75),
        ("win_rate", 0.6),
    }
    assert "model-index" in (out / "README.md").read_text()
    recipe_in_card = card.text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_in_card)["stage"] == "sft"
    plots = [name for name in uploaded if name.endswith(".png")]
    assert plots and all(f"]({name})" in card.text for name in plots)  # curves drawn from trainer_state.json
    assert "transformers:" in card.text and "trl:" in card.text


def test_card_names_the_hub_base_model_through_local_stages(tmp_path):
    sft = tmp_path / "sft"
    ppo = tmp_path / "ppo"
    sft.mkdir()
    ppo.mkdir()
    (sft / "recipe.yaml").write_text(
        yaml.safe_dump({"stage": "sft", "model_name_or_path": "HuggingFaceTB/SmolLM2-135M"})
    )
    (ppo / "recipe.yaml").write_text(
        yaml.safe_dump({"stage": "ppo", "model_name_or_path": str(sft), "dataset_name": "trl-lib/tldr"})
    )
    assert [link["stage"] for link in lineage(ppo)] == ["ppo", "sft", None]
    card = build_model_card(ppo, "me/ppo")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.datasets == ["trl-lib/tldr"]


def test_eval_json_from_rlhf_eval_feeds_the_model_index(tmp_path):
    out = tmp_path / "model"
    (out / "eval").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    evaluation = {
        "config": {"prompts_dataset": "synthetic:prompts"},
        "results": {
            "base": {"checkpoint": "elsewhere/base", "metrics": {"rule_reward": 0.1}},
            "model": {"checkpoint": str(out), "metrics": {"rule_reward": 0.9, "kl": 1.5}},
        },
    }
    (out / "eval" / "eval.json").write_text(json.dumps(evaluation))
    card = build_model_card(out, "me/model")
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {("rule_reward", 0.9), ("kl", 1.5)}
    assert card.data.eval_results[0].dataset_name == "synthetic:prompts"


def test_dry_run_writes_the_card_and_makes_no_request(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, out)
    with FakeHub() as hub:  # HF_HUB_OFFLINE=1 stays set: a dry run must not need the network at all
        files = main([str(out), "--repo-id", "me/tiny", "--dry-run", "--endpoint", hub.url])
    assert hub.requests == []
    assert (out / "README.md").is_file() and "README.md" in files and "model.safetensors" in files
    assert "model.safetensors" in capsys.readouterr().out


def test_unreachable_hub_or_missing_token_is_one_clear_error(tiny_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    out = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, out)
    before = _digests(out)
    _online(monkeypatch)
    with pytest.raises(RecipeError, match="failed.*intact"):
        main([str(out), "--repo-id", "me/tiny", "--token", "t", "--endpoint", _closed_port_url()])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(RecipeError, match="no Hugging Face token"):
        main([str(out), "--repo-id", "me/tiny"])
    after = _digests(out)
    assert {k: v for k, v in after.items() if k != "README.md"} == before


def test_publish_hook_reports_a_hub_failure_without_raising(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from transformers import TrainingArguments

    out = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, out)
    _online(monkeypatch, _closed_port_url())
    args = TrainingArguments(
        output_dir=str(out), push_to_hub=True, hub_model_id="me/x", hub_token="t", report_to="none"
    )
    assert publish_if_requested(out, args) is False
    message = capsys.readouterr().err.strip()
    assert message.startswith("push_to_hub:") and len(message.splitlines()) == 1
    assert (out / "model.safetensors").is_file()
    not_requested = TrainingArguments(output_dir=str(out), report_to="none")
    assert publish_if_requested(tiny_checkpoint, not_requested) is False
