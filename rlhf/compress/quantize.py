"""Post-training weight-only quantization that saves and reloads as a normal checkpoint directory.

rlhf quantize outputs/tiny/sft --method int8 --output outputs/tiny/sft-int8
rlhf quantize outputs/tiny/sft --method int4 --backend quanto --output outputs/tiny/sft-int4

Backends: optimum-quanto (int8, int4; the default) and torchao (int8 on CPU; int4 needs a GPU).
The quantized linear layers keep their weights in int8/int4 with per-channel or per-group scales;
everything else (embeddings, norms) is stored in `--dtype` (float32 by default; bfloat16 halves
it, which matters when the embedding is a large share of the model). Every output is
reloaded and checked against the in-memory quantized model before it is published, so a format
that does not round-trip (bitsandbytes 4-bit saved on CPU reloads silently wrong) never reaches a
user. `load_quantized(path)` reloads any of them; the method is recorded in `quantization.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

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
# The reloaded model must reproduce the in-memory quantized model's logits; a broken format is far off.
RELOAD_TOLERANCE = 1e-3


def check_request(method: str, backend: str, cuda: bool | None = None, dtype: str = "float32") -> None:
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


def _tied_output_name(model: PreTrainedModel) -> str | None:
    """Module name of the LM head when it shares its weight with the input embedding."""
    output = model.get_output_embeddings()
    if output is None or output.weight is not model.get_input_embeddings().weight:
        return None
    return next(name for name, module in model.named_modules() if module is output)


def quantize_and_save(
    checkpoint: str, output_dir: Path, method: str, backend: str, dtype: str, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Quantize `checkpoint`, save it (weights + quantization.json) into `output_dir`; return the model."""
    torch_dtype = getattr(torch, dtype)
    if backend == "quanto":
        from optimum.quanto import QuantizedModelForCausalLM, qint4, qint8

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        # Quantizing one side of a tied embedding/LM-head pair would store the matrix twice.
        tied = _tied_output_name(model)
        wrapper = QuantizedModelForCausalLM.quantize(
            model, weights=qint8 if method == "int8" else qint4, exclude=[tied] if tied else None
        )
        wrapper.save_pretrained(output_dir)
        quantized = wrapper._wrapped
    else:
        from transformers import BitsAndBytesConfig, TorchAoConfig

        if backend == "torchao":
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

            config = TorchAoConfig(Int8WeightOnlyConfig() if method == "int8" else Int4WeightOnlyConfig())
        else:
            config = BitsAndBytesConfig(load_in_8bit=method == "int8", load_in_4bit=method == "int4")
        quantized = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch_dtype, quantization_config=config, trust_remote_code=trust_remote_code
        )
        quantized.save_pretrained(output_dir)
    record = {"method": method, "backend": backend, "dtype": dtype, "source": str(checkpoint)}
    (output_dir / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return quantized


def load_quantized(path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a checkpoint written by `rlhf quantize` (any backend), or a plain checkpoint, for inference."""
    path = Path(path)
    record_file = path / QUANTIZATION_FILE
    record = json.loads(record_file.read_text()) if record_file.exists() else {"backend": None}
    if record["backend"] == "quanto":
        check_request(record["method"], "quanto")
        from optimum.quanto import QuantizedModelForCausalLM

        model = QuantizedModelForCausalLM.from_pretrained(str(path))._wrapped
    else:
        if record["backend"] is not None:
            check_request(record["method"], record["backend"])
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model.eval()


@torch.no_grad()
def verify_reload(model: PreTrainedModel, path: Path, tolerance: float = RELOAD_TOLERANCE) -> float:
    """Reload `path` and compare its logits with `model`'s; raise when they differ (a broken format)."""
    probe = torch.arange(2, min(model.config.vocab_size, 34)).unsqueeze(0)
    expected = model.eval()(probe).logits.float()
    reloaded = load_quantized(path)
    difference = float((reloaded(probe).logits.float() - expected).abs().max())
    if difference > tolerance:
        raise RecipeError(
            f"the quantized checkpoint does not reload correctly (logits differ by {difference:.3g} after "
            "save → load); nothing was written. Try another --backend."
        )
    return difference


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`rlhf quantize CHECKPOINT --method int8|int4 [--backend quanto|torchao] --output DIR`."""
    parser = argparse.ArgumentParser(prog="rlhf quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--method", required=True, help="int8 or int4 weight-only")
    parser.add_argument("--backend", default="quanto", help="quanto (default), torchao, bitsandbytes (int8)")
    parser.add_argument("--dtype", default="float32", help="dtype of the unquantized tensors: " + ", ".join(DTYPES))
    parser.add_argument("--output", required=True, help="output checkpoint directory")
    parser.add_argument("--no-eval", action="store_true", help="skip the quality measurements")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)

    from trl import ModelConfig

    from rlhf.artifacts import incomplete_dir, publish_dir, write_json
    from rlhf.compress import REPORT_FILE, quality_report, weights_size_bytes
    from rlhf.modeling import check_model_source, load_tokenizer

    check_model_source(args.checkpoint, "CHECKPOINT")
    check_request(args.method, args.backend, dtype=args.dtype)
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=args.checkpoint), args.trust_remote_code)

    report: dict[str, Any] = {"command": "quantize", "method": args.method, "backend": args.backend}
    report["size_bytes_before"] = weights_size_bytes(args.checkpoint)
    if not args.no_eval:
        original = AutoModelForCausalLM.from_pretrained(args.checkpoint, trust_remote_code=args.trust_remote_code)
        report["before"] = quality_report(original, tokenizer)
        del original

    final, tmp = Path(args.output), incomplete_dir(args.output)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        quantized = quantize_and_save(
            args.checkpoint, tmp, args.method, args.backend, args.dtype, args.trust_remote_code
        )
        tokenizer.save_pretrained(tmp)
        report["reload_max_logit_difference"] = verify_reload(quantized, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written or broken checkpoint behind
        raise
    report["size_bytes_after"] = weights_size_bytes(tmp)
    report["compression_ratio"] = report["size_bytes_before"] / report["size_bytes_after"]
    if not args.no_eval:
        report["after"] = quality_report(load_quantized(tmp), tokenizer)
    write_json(tmp / REPORT_FILE, report)
    publish_dir(tmp, final)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))
    return report


if __name__ == "__main__":
    from rlhf.cli import run

    run(main)
