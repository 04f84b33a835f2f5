"""GGUF in and out: export a checkpoint as GGUF, read it back with transformers, load a .gguf wherever a checkpoint goes."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from rlhf.config import RecipeError
from rlhf.export import export
from rlhf.gguf import check_gguf, check_writable, gguf_checkpoint
from rlhf.modeling import check_model_source
from rlhf.stages import sft
from tests.conftest import write_recipe

TEXT = "What color is the zorp? The zorp is blue."


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path_factory.getbasetemp() / "rlhf-cache"))


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint written as GGUF in each output type, through `rlhf export --format gguf`."""
    folder = tmp_path_factory.mktemp("gguf")
    return {
        outtype: export(str(tiny_checkpoint), folder / f"tiny.{outtype}.gguf", format="gguf", outtype=outtype)
        for outtype in ("f32", "f16", "q8_0")
    }


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(TEXT, return_tensors="pt")).logits


@pytest.mark.parametrize(("outtype", "tolerance"), [("f32", 1e-4), ("f16", 1e-2), ("q8_0", 0.1)])
def test_an_exported_gguf_reads_back_with_transformers_to_the_same_logits(
    tiny_checkpoint, exported, outtype, tolerance
):
    path = exported[outtype]
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    read_back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    read_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert read_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert read_tokenizer.eos_token == tokenizer.eos_token
    expected, got = logits(original, tokenizer), logits(read_back, tokenizer)
    assert (expected - got).abs().max().item() < tolerance * expected.abs().max().item()
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types == {"f32": {"F32"}, "f16": {"F16", "F32"}, "q8_0": {"Q8_0", "F32"}}[outtype]


def test_a_gguf_file_trains_as_model_name_or_path_and_the_output_is_safetensors(exported, tmp_path):
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(exported["f32"]),
        dataset_name="synthetic:sft",
        synthetic_num_examples=16,
        assistant_only_loss=True,
        max_length=64,
        max_steps=1,
        output_dir=str(tmp_path / "out"),
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    parsed = sft.parse([str(recipe)])
    converted = Path(parsed.model.model_name_or_path)
    assert converted.is_dir() and (converted / "model.safetensors").exists()
    sft.main([str(recipe)])
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not list((tmp_path / "out").glob("*.gguf"))
    # converted once: a second check reuses the folder
    assert check_model_source(str(exported["f32"])) == str(converted)


def test_a_truncated_gguf_is_one_line_naming_it(exported, tmp_path):
    truncated = tmp_path / "cut.gguf"
    data = exported["f16"].read_bytes()
    for size in (100, len(data) // 2):
        truncated.write_bytes(data[:size])
        with pytest.raises(
            RecipeError, match=r"^model_name_or_path: .*cut\.gguf is not a readable GGUF file .*truncated"
        ):
            gguf_checkpoint(str(truncated))


def test_an_architecture_transformers_cannot_read_is_refused(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "rwkv6")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(RecipeError, match=r"^model_name_or_path: odd\.gguf holds a 'rwkv6' model"):
        check_gguf(path, "model_name_or_path")


def test_export_refuses_what_it_cannot_write_before_loading(tiny_checkpoint, tmp_path):
    with pytest.raises(
        RecipeError, match=r"^CHECKPOINT: --format gguf writes llama, mistral models; this one is 'gpt2'"
    ):
        check_writable(GPT2Config())
    with pytest.raises(RecipeError, match=r"^--output: .* should name a \.gguf file"):
        export(str(tiny_checkpoint), tmp_path / "folder", format="gguf")
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(RecipeError, match="exists"):
        export(str(tiny_checkpoint), existing, format="gguf")
    assert existing.read_bytes() == b"keep"
    with pytest.raises(RecipeError, match=r"^model_name_or_path: 'package:no_such_pkg/x\.gguf' names package"):
        check_model_source("package:no_such_pkg/x.gguf")
