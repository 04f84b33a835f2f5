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
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import ModelConfig

from rlhf.artifacts import atomic_output_dir, check_output_dir, write_json
from rlhf.compress import REPORT_FILE, quality_report, weights_size_bytes
from rlhf.config import RecipeError
from rlhf.modeling import (
    DTYPES,
    QUANTIZATION_FILE,
    check_model_source,
    check_quantization,
    load_causal_lm,
    load_quantized,
    load_tokenizer,
)

# The reloaded model must reproduce the in-memory quantized model's logits; a broken format is far off.
RELOAD_TOLERANCE = 1e-3


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


def quantize(
    checkpoint: str,
    output: str | Path,
    method: str,
    backend: str = "quanto",
    dtype: str = "float32",
    no_eval: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Quantize `checkpoint` into `output` (written atomically) and return the size/quality report."""
    check_output_dir(output, "--output", inputs=(checkpoint,))
    check_model_source(checkpoint, "CHECKPOINT")
    check_quantization(method, backend, dtype=dtype)
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=checkpoint), trust_remote_code)

    report: dict[str, Any] = {"command": "quantize", "method": method, "backend": backend}
    report["size_bytes_before"] = weights_size_bytes(checkpoint)
    if not no_eval:
        original = load_causal_lm(ModelConfig(model_name_or_path=checkpoint), trust_remote_code)
        report["before"] = quality_report(original, tokenizer)
        del original

    with atomic_output_dir(output) as tmp:
        quantized = quantize_and_save(checkpoint, tmp, method, backend, dtype, trust_remote_code)
        tokenizer.save_pretrained(tmp)
        report["reload_max_logit_difference"] = verify_reload(quantized, tmp)
        report["size_bytes_after"] = weights_size_bytes(tmp)
        report["compression_ratio"] = report["size_bytes_before"] / report["size_bytes_after"]
        if not no_eval:
            report["after"] = quality_report(load_quantized(tmp), tokenizer)
        write_json(tmp / REPORT_FILE, report)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))
    return report


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
    return quantize(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
