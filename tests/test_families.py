"""The family matrix: every stage and command on tiny random checkpoints of GPT-2, OPT, GPT-NeoX, Qwen2, Llama 3,
Mistral and Gemma ("bring your own checkpoint").

Each family's base checkpoint, SFT output, LoRA SFT output and reward model are built once per
session (tests/families.py) and shared by its cells. Two properties are checked per family beyond
"it runs and saves something loadable":
- generation stops at the family's end of turn: a "stopper" copy of the SFT model is edited so that
  its greedy answer to one fixed prompt is one ordinary token then a chosen stop token; generate,
  eval, chat and PPO must all end the answer there, for every EOS id of the generation config;
- the reward score is read at the same token everywhere: the reward stage's statistics, PPO's and
  GRPO's rewards and eval's reward-model scores equal `rlhf.rewards.reward_model_scores` on the
  same (prompt, response).
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig
from trl import ModelConfig

from rlhf.artifacts import read_metrics
from rlhf.config import RecipeError
from rlhf.modeling import load_tokenizer
from rlhf.rewards import reward_model_scores
from tests.families import FAST, Family, run_stage, write_jsonl

# The per-family session fixtures (family, family_checkpoint, family_sft, …) live beside their builders.
pytest_plugins = ["tests.families"]

PROBE_TEXT = "What colour is a glim? A glim is blue."
STOP_PROMPT = [{"role": "user", "content": "What colour is a glim?"}]


def _logits(model_or_path, ids: torch.Tensor) -> torch.Tensor:
    model = (
        AutoModelForCausalLM.from_pretrained(model_or_path) if isinstance(model_or_path, str | Path) else model_or_path
    )
    with torch.no_grad():
        return model.eval()(ids).logits


def _probe(path: Path) -> torch.Tensor:
    return AutoTokenizer.from_pretrained(path)(PROBE_TEXT, return_tensors="pt")["input_ids"]


def _eos_list(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def _ppo_keys(family_data: dict[str, Path], **keys) -> dict:
    return {
        **FAST,
        "dataset_name": str(family_data["prompts"]),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_eval_samples": 4,
        "num_ppo_epochs": 1,
        "response_length": 8,
        **keys,
    }


# ---- the checkpoints themselves ----------------------------------------------------------------


def test_checkpoint_is_the_family_it_claims(family: Family, family_checkpoint: Path):
    config = json.loads((family_checkpoint / "config.json").read_text())
    assert config["architectures"] == [family.architecture]
    tokenizer = AutoTokenizer.from_pretrained(family_checkpoint)
    generation = GenerationConfig.from_pretrained(family_checkpoint)
    assert _eos_list(generation.eos_token_id) == tokenizer.convert_tokens_to_ids(list(family.generation_eos))
    assert tokenizer.pad_token == family.pad
    assert (tokenizer.chat_template is not None) == family.has_template


def test_loaded_tokenizer_is_ready_for_training(family: Family, family_checkpoint: Path):
    """load_tokenizer gives every family a pad token, an EOS, and a chat template that ends turns with an EOS."""
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(family_checkpoint)))
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A glim is blue."}]
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    generation = GenerationConfig.from_pretrained(family_checkpoint)
    stops = {tokenizer.eos_token_id, *_eos_list(generation.eos_token_id)}
    assert stops & set(ids), tokenizer.decode(ids)  # the assistant turn is closed by a token generation stops on
    if not family.has_template:  # a base model: the default template is built from its own vocabulary
        if tokenizer.unk_token_id not in (None, tokenizer.eos_token_id):
            assert tokenizer.unk_token_id not in ids, tokenizer.decode(ids)
        assert len(ids) < len(tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]) + 2


# ---- training stages ---------------------------------------------------------------------------


def test_sft_full(family: Family, family_checkpoint: Path, family_sft: Path):
    assert (family_sft / "model.safetensors").is_file() and not (family_sft / "adapter_config.json").exists()
    assert json.loads((family_sft / "config.json").read_text())["architectures"] == [family.architecture]
    # Every EOS id the base generation config stops on is still there after training.
    before = _eos_list(GenerationConfig.from_pretrained(family_checkpoint).eos_token_id)
    after = _eos_list(GenerationConfig.from_pretrained(family_sft).eos_token_id)
    assert set(before) <= set(after), (before, after)
    tokenizer = AutoTokenizer.from_pretrained(family_sft)
    assert tokenizer.eos_token_id in after
    assert not torch.equal(_logits(family_sft, _probe(family_sft)), _logits(family_checkpoint, _probe(family_sft)))


def test_sft_lora(family: Family, family_checkpoint: Path, family_sft_lora: Path):
    assert not (family_sft_lora / "adapter_config.json").exists()  # merged: loads as a plain checkpoint
    ids = _probe(family_checkpoint)
    assert not torch.equal(_logits(family_sft_lora, ids), _logits(family_checkpoint, ids))


def test_reward(family: Family, family_sft: Path, family_reward: Path, family_data: dict[str, Path]):
    """The reward stage's statistics are the one scorer's scores of the training pairs (same token read)."""
    metrics = read_metrics(family_reward)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval_pairs"] == 4
    model = AutoModelForSequenceClassification.from_pretrained(family_reward).eval()
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(family_reward)))
    rows = [json.loads(line) for line in family_data["preference_train"].read_text().splitlines()]
    prompts = [r["prompt"] for r in rows] * 2
    answers = [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows]
    scores = reward_model_scores(model, tokenizer, prompts, answers)
    assert metrics["reward_stats"]["num_scores"] == len(scores)
    assert metrics["reward_stats"]["mean"] == pytest.approx(scores.mean().item(), abs=1e-4)
    assert metrics["reward_stats"]["std"] == pytest.approx(scores.std().item(), abs=1e-4)


def test_dpo(family: Family, family_sft: Path, tmp_path: Path, family_data: dict[str, Path]):
    out = run_stage(
        "dpo", tmp_path, "dpo", model_name_or_path=str(family_sft), dataset_name=str(family_data["preference_train"]),
        max_length=160, **FAST,
    )  # fmt: skip
    assert not torch.equal(_logits(out, _probe(family_sft)), _logits(family_sft, _probe(family_sft)))


def test_grpo(family: Family, family_sft: Path, family_reward: Path, tmp_path: Path, monkeypatch):
    """GRPO trains, and the reward model's column of its rewards is the one scorer's score of each completion."""
    from rlhf.stages import grpo

    seen = []
    original = grpo.CheckedRewards._calculate_rewards

    def recording(self, inputs, prompts, completions, completion_ids_list):
        rewards = original(self, inputs, prompts, completions, completion_ids_list)
        seen.append((prompts, completions, rewards[:, 0].detach().cpu().clone()))
        return rewards

    monkeypatch.setattr(grpo.CheckedRewards, "_calculate_rewards", recording)
    out = run_stage(
        "grpo", tmp_path, "grpo", model_name_or_path=str(family_sft), reward_model_path=str(family_reward),
        reward_min_accuracy=0, dataset_name="synthetic:prompts", num_generations=2, max_completion_length=8,
        **FAST,
    )  # fmt: skip
    assert (out / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(family_reward).eval()
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(family_reward)))
    prompts, completions, scores = seen[0]
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    torch.testing.assert_close(scores, reward_model_scores(model, tokenizer, prompts, texts), atol=1e-4, rtol=1e-4)


def _recording_ppo_scores(monkeypatch) -> list:
    from rlhf.ppo import rollout

    seen = []
    original = rollout.RolloutMaker.score

    def recording(self, rows, completions, where, across_processes):
        result = original(self, rows, completions, where, across_processes)
        seen.append(([r["prompt"] for r in rows], list(completions), result[0].detach().cpu().clone()))
        return result

    monkeypatch.setattr(rollout.RolloutMaker, "score", recording)
    return seen


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo(family: Family, family_sft: Path, family_reward: Path, family_data, tmp_path: Path, monkeypatch, lora):
    """PPO trains (full or LoRA) and scores each completion with the one scorer (normalised by the reward stats)."""
    seen = _recording_ppo_scores(monkeypatch)
    lora_keys = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": list(family.lora_targets)}
    out = run_stage(
        "ppo", tmp_path, "ppo", model_name_or_path=str(family_sft), reward_model_path=str(family_reward),
        reward_min_accuracy=0, **_ppo_keys(family_data, **(lora_keys if lora else {})),
    )  # fmt: skip
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == [family.architecture]
    metrics = read_metrics(out)
    assert metrics["train"]["train_updates"] == 1 and math.isfinite(metrics["eval"]["eval_reward"])
    stats = read_metrics(family_reward)["reward_stats"]
    model = AutoModelForSequenceClassification.from_pretrained(family_reward).eval()
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(family_reward)))
    for prompts, completions, scores in seen:
        expected = (reward_model_scores(model, tokenizer, prompts, completions) - stats["mean"]) / stats["std"]
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


# ---- commands on finished outputs --------------------------------------------------------------


def test_eval(family: Family, family_sft: Path, family_checkpoint: Path, family_reward: Path, tmp_path: Path):
    """`rlhf eval` runs, and its reward-model scores are the one scorer's scores of its answers."""
    from rlhf.evaluation.runner import evaluate

    out = evaluate(
        [family_sft],
        output=tmp_path / "eval",
        sections=["generation", "win_rate", "kl", "reward_model", "perplexity"],
        reference_model_path=str(family_checkpoint),
        reward_model_path=str(family_reward),
        num_prompts=4,
        max_new_tokens=8,
        num_preference_pairs=4,
        num_perplexity_texts=4,
        num_report_samples=4,
        html=False,
    )
    result = json.loads((out / "eval.json").read_text())["results"]["sft"]
    assert math.isfinite(result["metrics"]["perplexity"]) and math.isfinite(result["metrics"]["kl"])
    model = AutoModelForSequenceClassification.from_pretrained(family_reward).eval()
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(family_reward)))
    from rlhf.evaluation.context import EvalConfig, load_prompts

    rows = load_prompts(EvalConfig(num_prompts=4))
    responses = [s["response"] for s in result["samples"]]
    expected = reward_model_scores(model, tokenizer, [r["prompt"] for r in rows], responses)
    assert result["scores"]["reward_model"] == pytest.approx(expected.tolist(), abs=1e-4)


def test_merge(family: Family, family_checkpoint: Path, family_adapter: Path, tmp_path: Path):
    from peft import PeftModel

    from rlhf.export import merge_main

    merged = merge_main([str(family_adapter), "--output", str(tmp_path / "merged")])
    ids = _probe(family_checkpoint)
    base = AutoModelForCausalLM.from_pretrained(family_checkpoint)
    expected = _logits(PeftModel.from_pretrained(base, family_adapter), ids)
    assert not torch.allclose(expected, _logits(family_checkpoint, ids), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-4)
    assert not (merged / "adapter_config.json").exists()
    assert AutoTokenizer.from_pretrained(merged)(PROBE_TEXT)["input_ids"] == ids[0].tolist()


def test_export(family: Family, family_sft: Path, tmp_path: Path):
    from rlhf.export import export_main

    out = export_main([str(family_sft), "--output", str(tmp_path / "export")])
    ids = _probe(family_sft)
    torch.testing.assert_close(_logits(out, ids), _logits(family_sft, ids))
    assert json.loads((out / "config.json").read_text())["architectures"] == [family.architecture]
    assert set(_eos_list(GenerationConfig.from_pretrained(family_sft).eos_token_id)) <= set(
        _eos_list(GenerationConfig.from_pretrained(out).eos_token_id)
    )
    assert not (out / "metrics.json").exists()


def test_generate(family: Family, family_sft: Path, tmp_path: Path):
    from rlhf.export import generate_main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "A glim is"}, {"prompt": STOP_PROMPT}])
    out = generate_main([str(family_sft), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                         "--max-new-tokens", "6"])  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)


def _chat(checkpoint: Path, lines: str, monkeypatch, capsys) -> list[str]:
    """`rlhf chat` in-process with piped stdin; the assistant replies it printed."""
    from rlhf.export import chat_main

    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    capsys.readouterr()
    chat_main([str(checkpoint), "--max-new-tokens", "8", "--temperature", "0"])
    return [part.strip() for part in capsys.readouterr().out.split("assistant> ")[1:]]


def test_chat(family: Family, family_sft: Path, monkeypatch, capsys):
    replies = _chat(family_sft, "hello\nWhat colour is a glim?\n/reset\nhello\n/exit\n", monkeypatch, capsys)
    assert len(replies) == 3 and replies[2] == replies[0]


@pytest.mark.parametrize("backend", ["quanto", "torchao"])
def test_quantize_int8(family: Family, family_sft: Path, tmp_path: Path, backend: str):
    """int8 really quantizes every family (Conv1D and `embed_out` heads included) and reloads to the same logits."""
    pytest.importorskip("optimum.quanto" if backend == "quanto" else "torchao")
    from rlhf.compress.quantize import quantize
    from rlhf.quantized import load_quantized

    out = tmp_path / "int8"
    if backend in family.quantize_refusals:  # documented: the backend cannot quantize this family's layers
        with pytest.raises(RecipeError, match=family.quantize_refusals[backend]):
            quantize(str(family_sft), out, "int8", backend, no_eval=True)
        assert not out.exists() and not (tmp_path / "int8.incomplete").exists()
        return
    report = quantize(str(family_sft), out, "int8", backend, no_eval=True)
    assert report["quantized_modules"] > 0
    assert report["compression_ratio"] > 1.15, report  # hidden 32: the fp32 embedding is most of the model
    ids = _probe(family_sft)
    reloaded = _logits(load_quantized(out), ids)
    assert not torch.equal(reloaded, _logits(family_sft, ids))
    assert torch.allclose(reloaded, _logits(family_sft, ids), atol=0.5)


# ---- generation stops at the family's end of turn ------------------------------------------------


def _stop_tokens(family: Family) -> list[str]:
    return list(dict.fromkeys([*([family.end_of_turn] if family.end_of_turn else []), *family.generation_eos]))


def build_stopper(source: Path, out: Path, stop_id: int) -> tuple[list[int], list[int]]:
    """A copy of `source` whose greedy answer to STOP_PROMPT is one ordinary token, then `stop_id`.

    Only the output head changes (untied from the input embedding, two rows swapped, then scaled so
    that sampling is as good as greedy); returns (the stopped answer's ids, what follows it if not stopped).
    """
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(source)))
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    head = model.get_output_embeddings()
    weight = head.weight.detach().clone()
    model.config.tie_word_embeddings = False
    head.weight = torch.nn.Parameter(weight)
    specials = set(tokenizer.all_special_ids) | {stop_id} | set(_eos_list(model.generation_config.eos_token_id))
    prompt = tokenizer.apply_chat_template(STOP_PROMPT, add_generation_prompt=True, return_dict=False)
    prompt = torch.tensor([prompt])

    def swap(a: int, b: int) -> None:
        with torch.no_grad():
            weight[[a, b]] = weight[[b, a]]

    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
        visible = (i for i in range(len(logits)) if i not in specials and tokenizer.decode([i]).strip())
        ordinary = max(visible, key=lambda i: logits[i].item())  # a word, not whitespace the answer strips
        swap(int(logits.argmax()), ordinary)  # the first answer token is an ordinary one
        after = model(torch.cat([prompt, torch.tensor([[ordinary]])], 1)).logits[0, -1]
        if int(after.argmax()) != stop_id:
            swap(int(after.argmax()), stop_id)  # ... and the second one is the stop token
        # ... and, not stopped, the answer goes on with a word: generating with the stop tokens suppressed
        # takes the best other token, and whitespace (a tokenizer's "\x0b") decodes to nothing after strip
        after = model(torch.cat([prompt, torch.tensor([[ordinary]])], 1)).logits[0, -1]
        others = [i for i in range(len(after)) if i not in specials | {ordinary}]
        runner_up = max(others, key=lambda i: after[i].item())
        if not tokenizer.decode([runner_up]).strip():
            word = max((i for i in others if tokenizer.decode([i]).strip()), key=lambda i: after[i].item())
            swap(runner_up, word)  # neither row is an argmax so far: the first two tokens stay
        weight *= 1000.0
    model.generation_config = GenerationConfig(**{**model.generation_config.to_diff_dict()})

    def greedy(eos) -> list[int]:
        config = GenerationConfig(
            max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            min_new_tokens=None if eos is not None else 8,
        )  # fmt: skip
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)[
            0, prompt.shape[1] :
        ].tolist()

    stopped, unstopped = greedy([stop_id]), greedy(None)
    assert stopped[-1] == stop_id and len(stopped) <= 2, stopped
    follow = unstopped[len(stopped) :]
    assert (
        tokenizer.decode(unstopped, skip_special_tokens=True).strip()
        != tokenizer.decode(stopped, skip_special_tokens=True).strip()
    ), "the stopper must say more when it is not stopped"
    model.save_pretrained(out)
    tokenizer_files = AutoTokenizer.from_pretrained(source)
    tokenizer_files.save_pretrained(out)
    return stopped, follow


def _stop_id(family: Family, checkpoint: Path, token: str) -> int:
    return AutoTokenizer.from_pretrained(checkpoint).convert_tokens_to_ids(token)


def _decoded(checkpoint: Path, ids: list[int]) -> str:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_generate_stops_on_every_eos_of_the_generation_config(family: Family, family_sft: Path, tmp_path: Path):
    from rlhf.export import generate_main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": STOP_PROMPT}])
    failures = []
    for token in _stop_tokens(family):
        stopper = tmp_path / f"stopper-{len(failures)}-{abs(hash(token))}"
        stopped, _ = build_stopper(family_sft, stopper, _stop_id(family, family_sft, token))
        out = generate_main([str(stopper), "--input", str(prompts), "--output", str(stopper / "o.jsonl"),
                             "--max-new-tokens", "8"])  # fmt: skip
        response = json.loads(out.read_text())["response"]
        if response != _decoded(stopper, stopped):
            failures.append(f"{token}: {response!r} != {_decoded(stopper, stopped)!r}")
    assert not failures, failures


@pytest.fixture
def end_of_turn_stopper(family: Family, family_sft: Path, tmp_path: Path) -> tuple[Path, list[int]]:
    """The stopper whose stop token is the family's end of turn (a base model's: its generation EOS)."""
    token = family.end_of_turn or family.generation_eos[0]
    stopper = tmp_path / "stopper"
    stopped, _ = build_stopper(family_sft, stopper, _stop_id(family, family_sft, token))
    return stopper, stopped


def test_eval_stops_at_the_end_of_turn(end_of_turn_stopper, tmp_path: Path):
    from rlhf.evaluation.runner import evaluate

    stopper, stopped = end_of_turn_stopper
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": STOP_PROMPT}])
    out = evaluate([stopper], output=tmp_path / "eval", sections=["generation"], prompts_dataset=str(prompts),
                   prompts_split="train", num_prompts=1, max_new_tokens=8, html=False)  # fmt: skip
    result = json.loads((out / "eval.json").read_text())["results"]["stopper"]
    assert result["generation"]["lengths"] == [len(stopped)]
    assert result["samples"][0]["response"] == _decoded(stopper, stopped)


def test_chat_stops_at_the_end_of_turn(end_of_turn_stopper, monkeypatch, capsys):
    stopper, stopped = end_of_turn_stopper
    replies = _chat(stopper, STOP_PROMPT[0]["content"] + "\n", monkeypatch, capsys)
    assert replies == [_decoded(stopper, stopped)]


def test_ppo_rollouts_stop_at_the_end_of_turn(end_of_turn_stopper, tmp_path: Path, family_data, monkeypatch):
    stopper, stopped = end_of_turn_stopper
    seen = _recording_ppo_scores(monkeypatch)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": STOP_PROMPT}] * 8)
    out = run_stage(
        "ppo", tmp_path, "ppo", model_name_or_path=str(stopper),
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        **_ppo_keys(family_data, dataset_name=str(prompts), learning_rate=1e-9),
    )  # fmt: skip
    metrics = read_metrics(out)
    assert metrics["eval_before"]["eval_before_response_length"] == len(stopped)
    assert {c for _, completions, _ in seen for c in completions} == {_decoded(stopper, stopped)}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[0]["response_length/mean"] == len(stopped)
