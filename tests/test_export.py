"""Merging adapters, exporting, chatting and batch generation on a tiny real model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import RecipeError
from rlhf.export import export_main, generate_main, merge_main

REPO_ROOT = Path(__file__).resolve().parents[1]


def _logits(model_dir_or_model, input_ids: torch.Tensor) -> torch.Tensor:
    model = model_dir_or_model
    if isinstance(model, str | Path):
        model = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.fixture(scope="module")
def sample_ids(tiny_checkpoint: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    return tokenizer(["What colour is a glim? A glim is blue."], return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module", params=["lora", "dora"])
def adapter(request, tiny_checkpoint: Path, sample_ids: torch.Tensor, tmp_path_factory) -> Path:
    """A real adapter: peft's get_peft_model plus a few optimizer steps, saved without a tokenizer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        use_dora=request.param == "dora",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        peft_model(input_ids=sample_ids, labels=sample_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp(request.param) / "adapter"
    peft_model.save_pretrained(out)
    return out


def test_merge_gives_the_logits_of_base_plus_adapter(adapter: Path, tiny_checkpoint, sample_ids, tmp_path):
    from peft import PeftModel

    merged = merge_main([str(adapter), "--output", str(tmp_path / "merged")])

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    base_logits = _logits(base, sample_ids)
    adapted_logits = _logits(PeftModel.from_pretrained(base, adapter), sample_ids)
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the trained adapter changes the model
    torch.testing.assert_close(_logits(merged, sample_ids), adapted_logits, atol=1e-5, rtol=1e-4)

    files = set(os.listdir(merged))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert "chat_template.jinja" in files or "chat_template" in (merged / "tokenizer_config.json").read_text()
    assert not files & {"adapter_config.json", "adapter_model.safetensors"}
    assert (
        AutoTokenizer.from_pretrained(merged).eos_token_id
        == json.loads((merged / "config.json").read_text())["eos_token_id"]
    )


def test_merge_refuses_a_full_checkpoint(tiny_checkpoint, tmp_path):
    with pytest.raises(RecipeError, match="adapter_config.json"):
        merge_main([str(tiny_checkpoint), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_sharded_export_is_clean_and_loads_with_pipeline(tiny_checkpoint, sample_ids, tmp_path):
    from transformers import pipeline

    # A stage output carries training leftovers that an inference folder must not.
    stage = tmp_path / "stage"
    shutil.copytree(tiny_checkpoint, stage)
    leftovers = ["metrics.json", "trainer_state.json", "training_args.bin", "optimizer.pt", "recipe.yaml"]
    for name in leftovers:
        (stage / name).write_text("{}")
    (stage / "checkpoint-2").mkdir()
    (stage / "checkpoint-2" / "optimizer.pt").write_text("x")

    out = export_main([str(stage), "--output", str(tmp_path / "export"), "--max-shard-size", "200KB"])

    files = set(os.listdir(out))
    assert not files & {*leftovers, "checkpoint-2"}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    for shard in shards:  # every shard is plain safetensors and every listed tensor is in its shard
        with safe_open(out / shard, "pt") as handle:
            assert {k for k, v in index["weight_map"].items() if v == shard} == set(handle.keys())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())  # loads online too
    torch.testing.assert_close(_logits(out, sample_ids), _logits(tiny_checkpoint, sample_ids))

    generator = pipeline("text-generation", model=str(out))
    reply = generator([{"role": "user", "content": "hello"}], max_new_tokens=5, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def test_export_of_an_adapter_merges_and_casts(adapter: Path, tmp_path):
    out = export_main([str(adapter), "--output", str(tmp_path / "export"), "--dtype", "bfloat16"])
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert "lora" not in " ".join(safe_open(out / "model.safetensors", "pt").keys())


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPT_ROWS = [
    {"id": 1, "prompt": "What colour is a glim?"},
    {"id": 2, "prompt": [{"role": "user", "content": "hello"}]},
    {"id": 3, "messages": [{"role": "user", "content": "What do glims eat?"}, {"role": "assistant", "content": "x"}]},
    {"id": 4, "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
    {"id": 5, "prompt": "Tell me about zorbs."},
]


def test_generate_writes_one_row_per_prompt_reproducibly(tiny_checkpoint, tmp_path):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    common = [str(tiny_checkpoint), "--input", str(prompts), "--batch-size", "2", "--max-new-tokens", "6"]
    sampling = ["--temperature", "1.0", "--top-p", "0.95"]

    def run(name: str, *extra: str) -> list[dict]:
        generate_main([*common, "--output", str(tmp_path / name), *extra])
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    first = run("a.jsonl", *sampling, "--seed", "3")
    again = run("b.jsonl", *sampling, "--seed", "3")
    other = run("c.jsonl", *sampling, "--seed", "4")
    assert [r["id"] for r in first] == [1, 2, 3, 4, 5]  # order and input columns kept
    assert first == again
    assert [r["response"] for r in first] != [r["response"] for r in other]
    assert not list(tmp_path.glob("*.tmp"))

    multi = run("d.jsonl", *sampling, "--num-return-sequences", "3")
    assert len(multi) == 5 and all(len(r["responses"]) == 3 for r in multi)
    assert any(len(set(r["responses"])) > 1 for r in multi)  # independent samples, not copies


def test_generate_greedy_matches_the_shared_generation_helper(tiny_checkpoint, tmp_path):
    from rlhf.evaluation.generation import generate_responses
    from rlhf.export import load_for_inference

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS[:2])
    out = tmp_path / "o.jsonl"
    generate_main([str(tiny_checkpoint), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "8"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model, tokenizer = load_for_inference(str(tiny_checkpoint))
    expected = generate_responses(model, tokenizer, [r["prompt"] for r in PROMPT_ROWS[:2]], max_new_tokens=8)
    assert [r["response"] for r in rows] == expected


def test_generate_input_mistakes_are_clear(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RecipeError, match="not found"):
        generate_main([str(tiny_checkpoint), "--input", str(tmp_path / "missing.jsonl"), "--output", str(out)])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "where is my prompt?"}])
    with pytest.raises(RecipeError, match=r"line 2.*`prompt`.*question"):
        generate_main([str(tiny_checkpoint), "--input", str(bad), "--output", str(out)])
    assert not out.exists()


def test_chat_streams_replies_keeps_history_and_resets(tiny_checkpoint):
    from rlhf.evaluation.generation import generate_responses
    from rlhf.export import load_for_inference

    system = {"role": "system", "content": "Be brief."}
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "chat", str(tiny_checkpoint), "--system", "Be brief."]
        + ["--max-new-tokens", "8", "--temperature", "0"],
        input="hello\nWhat colour is a glim?\n/reset\nhello\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    replies = [part.strip() for part in result.stdout.split("assistant> ")[1:]]
    assert len(replies) == 3  # /reset and /exit are commands, not messages; nothing read after /exit

    # Greedy replies must equal plain generation on the same conversation, history included.
    model, tokenizer = load_for_inference(str(tiny_checkpoint))
    first = [system, {"role": "user", "content": "hello"}]
    second = [
        *first,
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "What colour is a glim?"},
    ]
    expected = generate_responses(model, tokenizer, [first, second], max_new_tokens=8, batch_size=1)
    assert replies[:2] == expected
    assert replies[2] == replies[0]  # after /reset the conversation starts over
