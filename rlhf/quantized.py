"""Checkpoints written by `rlhf quantize`: which method/backend pairs work here, and loading them back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf.checkpoint_files import local_files, refuse_pickle_weights, warn_remote_code
from rlhf.config import RecipeError

QUANTIZATION_FILE = "quantization.json"
METHODS = ("int8", "int4")
BACKENDS = ("quanto", "torchao", "bitsandbytes")
# backend → (module to import, pip extra that installs it)
BACKEND_PACKAGES = {
    "quanto": ("optimum.quanto", "quant"),
    "torchao": ("torchao", "quant"),
    "bitsandbytes": ("bitsandbytes", "qlora"),
}
DTYPES = ("bfloat16", "float16", "float32")


def check_quantization(method: str, backend: str, cuda: bool | None = None, dtype: str = "float32") -> None:
    """Refuse unsupported method/backend combinations and missing packages, before any model loads."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if method not in METHODS:
        raise RecipeError(f"--method: got {method!r}, expected one of {', '.join(METHODS)}.")
    if backend not in BACKENDS:
        raise RecipeError(f"--backend: got {backend!r}, expected one of {', '.join(BACKENDS)}.")
    if backend == "bitsandbytes" and method == "int4" and not cuda:
        raise RecipeError(
            "--backend bitsandbytes --method int4: a bitsandbytes 4-bit model saved on CPU reloads with wrong "
            "weights (silently), so it is refused; use --backend quanto for int4 on CPU."
        )
    if backend == "torchao" and method == "int4" and not cuda:
        raise RecipeError(
            "--backend torchao --method int4: torchao's int4 weight-only kernels need a CUDA GPU; "
            "use --backend quanto for int4 on CPU."
        )
    if backend == "quanto" and method == "int8" and dtype == "bfloat16" and not cuda:
        # quanto routes bf16 x int8 through torch._weight_int8pack_mm on CPU, which segfaulted here for a
        # 64-wide model (torch 2.13); float32 takes the dequantizing path.
        raise RecipeError("--dtype bfloat16 with --backend quanto --method int8 crashes on CPU; use --dtype float32.")
    if dtype not in DTYPES:
        raise RecipeError(f"--dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}.")
    module, extra = BACKEND_PACKAGES[backend]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise RecipeError(
            f"--backend {backend}: the {module.split('.')[-1]} package is not installed; "
            f"install it with `pip install 'rlhf[{extra}]'`."
        )


def load_quantized(path: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> PreTrainedModel:
    """Load a checkpoint written by `rlhf quantize` (any backend), or a plain checkpoint, for inference."""
    path = Path(path)
    if not allow_pickle and path.is_dir():
        refuse_pickle_weights(local_files(path), str(path))
    warn_remote_code(path, trust_remote_code)
    record_file = path / QUANTIZATION_FILE
    record = json.loads(record_file.read_text()) if record_file.exists() else {"backend": None}
    if record["backend"] == "quanto":
        check_quantization(record["method"], "quanto")
        from optimum.quanto import QuantizedModelForCausalLM

        model = QuantizedModelForCausalLM.from_pretrained(str(path))._wrapped
    else:
        if record["backend"] is not None:
            check_quantization(record["method"], record["backend"])
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True
        )
    return model.eval()
