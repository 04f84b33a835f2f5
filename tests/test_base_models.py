"""What a user's own checkpoint gets: a chat template and EOS when it has none, every EOS kept, adapters loaded,
finished outputs protected, and nothing left behind by a failed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import ModelArguments, RecipeError
from rlhf.data.synthetic import make_synthetic_dataset
from rlhf.entrypoint import run
from rlhf.modeling import align_generation_config, eos_token_ids, load_causal_lm, load_tokenizer
from rlhf.stages import sft
from rlhf.token_checks import check_tokenizer_fit
from tests.conftest import FAST_TRAINING, write_recipe

MESSAGES = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]


def _base_copy(tiny_checkpoint: Path, folder: Path, drop: tuple[str, ...] = ("chat_template",)) -> Path:
    """The tiny checkpoint as a base model: its tokenizer without a chat template (and the given keys)."""
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in drop}
    config_file.write_text(json.dumps(config))
    return folder


def _trained_tokens(tokenizer, messages=MESSAGES) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    return [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]


def test_a_base_tokenizer_gets_a_template_of_its_own_tokens_with_eos_trained(tiny_checkpoint, tmp_path, capsys):
    base = _base_copy(tiny_checkpoint, tmp_path / "base")
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(base)))
    load_tokenizer(ModelArguments(model_name_or_path=str(base)))
    announced = capsys.readouterr().err
    assert announced.count("has no chat template") == 1  # said once, however often it loads

    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert "<|im_start|>" not in text  # no markers from another vocabulary
    trained = _trained_tokens(tokenizer)
    assert trained[-1] == tokenizer.eos_token_id and tokenizer.decode(trained[:-1]) == "Hi there."
    # every piece of the rendered text is a token of this vocabulary (no unknown tokens)
    assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]
    # a prompt ends where its completion starts: tokenising them apart gives the same ids (TRL relies on it)
    prompt = tokenizer.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"][: len(prompt_ids)] == prompt_ids


def test_a_tokenizer_without_eos_gets_one_and_the_model_grows_when_it_is_new(tiny_checkpoint, tmp_path):
    in_vocab = _base_copy(tiny_checkpoint, tmp_path / "no-eos", drop=("chat_template", "eos_token"))
    assert AutoTokenizer.from_pretrained(in_vocab).eos_token is None
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(in_vocab)))
    assert tokenizer.eos_token == "<|im_end|>"  # an end token the vocabulary already has
    assert _trained_tokens(tokenizer)[-1] == tokenizer.eos_token_id

    # A vocabulary with no end-of-text token at all: one is added, and the embeddings grow to hold it.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["hello there", "hi you"] * 20, trainers.BpeTrainer(vocab_size=300))
    bare = tmp_path / "bare"
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(bare)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(bare)))
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == len(tokenizer) - 1
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model.resize_token_embeddings(len(tokenizer) - 1)
    align_generation_config(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert tokenizer.eos_token_id in eos_token_ids(model, tokenizer)


def test_align_generation_config_keeps_every_eos_and_never_nulls_the_configs(tiny_checkpoint):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_checkpoint)))
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    # Qwen2/Llama-3 style: the turn ends on one token, the text on another.
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]
    align_generation_config(model, tokenizer)
    assert model.generation_config.eos_token_id == [7, tokenizer.eos_token_id]
    model.generation_config.eos_token_id = 7
    align_generation_config(model, tokenizer)
    assert sorted(eos_token_ids(model, tokenizer)) == sorted([7, tokenizer.eos_token_id])
    assert model.config.eos_token_id == tokenizer.eos_token_id

    # Greedy generation stops at the first of them, whichever it is.
    from rlhf.evaluation.generation import generate_tokens

    first = generate_tokens(model, tokenizer, ["Hello!"], max_new_tokens=12)[0][1]
    stop = first[min(3, len(first) - 1)]
    model.generation_config.eos_token_id = [stop, tokenizer.eos_token_id]
    response = generate_tokens(model, tokenizer, ["Hello!"], max_new_tokens=12)[0][1]
    assert response[-1] == stop and stop not in response[:-1]


def test_an_adapter_folder_loads_as_its_base_with_the_adapter_merged(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    from rlhf.modeling import check_model_source

    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # no config.json, no tokenizer: an adapter as users bring it
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    check_model_source(str(adapter))
    args = ModelArguments(model_name_or_path=str(adapter))
    model = load_causal_lm(args)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-4)
    assert load_tokenizer(args).eos_token == "<|im_end|>"  # the base's tokenizer


def test_ppo_from_an_adapter_folder_starts_its_critic_on_the_base(tiny_checkpoint, tmp_path):
    """The default value model is a value head on the policy checkpoint; an adapter folder has no full weights,
    so the critic starts from the base the adapter names (the policy itself loads with the adapter merged)."""
    from peft import LoraConfig, get_peft_model

    from rlhf.stages import ppo

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), LoraConfig(r=2)).save_pretrained(adapter)
    out = tmp_path / "ppo"
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(adapter),
        dataset_name="synthetic:prompts",
        synthetic_num_examples=32,
        max_eval_samples=4,
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        response_length=4,
        max_steps=1,
        num_ppo_epochs=1,
        output_dir=str(out),
        **{**FAST_TRAINING, "per_device_train_batch_size": 4},
    )
    ppo.main([str(recipe)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["value_model"]["path"] == str(tiny_checkpoint)
    assert (
        AutoModelForCausalLM.from_pretrained(out).num_parameters()
        == AutoModelForCausalLM.from_pretrained(tiny_checkpoint).num_parameters()
    )


def test_an_untrainable_template_is_refused_before_loading(tiny_checkpoint, tmp_path):
    # A template that rewrites what it renders: no assistant reply can be found in its text to mask.
    template = tmp_path / "chatml.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        assistant_only_loss=True,
        chat_template_path=str(template),
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(
        RecipeError,
        match=r"^assistant_only_loss: the chat template in .*chatml.jinja message 0 \(user\) is not rendered verbatim",
    ):
        sft.parse([str(recipe)])
    sft.parse([str(recipe), "--assistant_only_loss", "false"])  # the fix the message names


def test_a_finished_output_of_another_stage_or_recipe_is_not_overwritten(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    keys = dict(
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        synthetic_num_examples=16,
        max_length=48,
        max_steps=1,
        output_dir=str(out),
        **FAST_TRAINING,
    )
    first = write_recipe(tmp_path / "first.yaml", **keys)
    sft.main([str(first)])
    weights = (out / "model.safetensors").read_bytes()

    second = write_recipe(tmp_path / "second.yaml", **keys)
    with pytest.raises(SystemExit) as exit_info:
        run(sft.main, [str(second)])
    assert exit_info.value.code == 2
    assert "holds a finished sft output from" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights
    # Its own recipe may replace it, and so may another with --overwrite_output_dir.
    sft.parse([str(first)])
    sft.parse([str(second), "--overwrite_output_dir", "true"])
    # A command never writes over a training stage's output.
    from rlhf.export import export

    with pytest.raises(RecipeError, match="holds a finished sft output"):
        export(str(tiny_checkpoint), out)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    # A template whose replies end in no EOS is found after the trainer is built (output started).
    template = tmp_path / "template.jinja"
    template.write_text(
        "{%- for m in messages %}{%- if m['role'] == 'assistant' %}<|im_start|>assistant\n{{ m['content'] }}\n\n"
        "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endif %}{%- endfor %}"
    )
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        synthetic_num_examples=16,
        assistant_only_loss=True,
        chat_template_path=str(template),
        max_steps=1,
        output_dir=str(tmp_path / "out"),
        **FAST_TRAINING,
    )
    with pytest.raises(SystemExit):
        run(sft.main, [str(recipe)])
    assert "the EOS token '<|im_end|>' is in none of the first 8 training rows' loss masks" in capsys.readouterr().err
    # no .incomplete folder, and the lock is free (its holder record gone; filelock keeps the empty lock file)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["sft.yaml", "template.jinja"]
    assert not list(tmp_path.glob(".*.json"))


def test_tokenizer_fit_warns_once_when_the_data_is_another_language(tiny_checkpoint, capsys):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_checkpoint)))
    fitted = check_tokenizer_fit(tokenizer, list(make_synthetic_dataset("sft", 16)))  # the world it was trained on
    assert fitted["tokens_per_word"] < 2.0
    assert "fits this data badly" not in capsys.readouterr().err
    foreign = [{"messages": [{"role": "user", "content": "Übermäßige Geschwindigkeitsüberschreitungen kosten"}]}]
    fit = check_tokenizer_fit(tokenizer, foreign * 4)
    assert fit["tokens_per_word"] > 2.0
    assert capsys.readouterr().err.count("fits this data badly") == 1
