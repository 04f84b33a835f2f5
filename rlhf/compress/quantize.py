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

quanto and torchao quantize `nn.Linear` layers only: a checkpoint whose blocks are transformers'
`Conv1D` (GPT-2 and its kin) is refused before it loads, naming bitsandbytes (which converts
Conv1D), and an output in which nothing was quantized is never published.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import ModelConfig

from rlhf.compress import REPORT_FILE, quality_report, weights_size_bytes
from rlhf.config import RecipeError

if TYPE_CHECKING:  # torch, transformers and the loaders load when a model is quantized, not for --help
    from transformers import PreTrainedModel

# The reloaded model must reproduce the in-memory quantized model's logits; a broken format is far off.
RELOAD_TOLERANCE = 1e-3


def _tied_output_name(model: PreTrainedModel) -> str | None:
    """Module name of the LM head when it shares its weight with the input embedding."""
    output = model.get_output_embeddings()
    if output is None or output.weight is not model.get_input_embeddings().weight:
        return None
    return next(name for name, module in model.named_modules() if module is output)


def check_quantizable(checkpoint: str, backend: str, trust_remote_code: bool = False) -> None:
    """Refuse, before the weights load, a checkpoint whose layers `backend` cannot quantize (e.g. GPT-2's Conv1D)."""
    if backend == "bitsandbytes":
        return  # transformers' bitsandbytes integration converts Conv1D as well as nn.Linear
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    # Built on the meta device: the module tree without allocating or reading any weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    conv1d = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    output = model.get_output_embeddings()
    blocks = [name for name in linear if output is None or model.get_submodule(name) is not output]
    if conv1d or not blocks:
        kind = f"transformers Conv1D layers ({conv1d[0]}, …)" if conv1d else "no nn.Linear layers"
        raise RecipeError(
            f"--backend {backend}: {type(model).__name__}'s blocks are {kind}, which {backend} cannot quantize, so "
            "nothing would be quantized; use --backend bitsandbytes --method int8 (`pip install 'rlhf[qlora]'`)."
        )


def quantized_modules(model: PreTrainedModel, backend: str) -> list[str]:
    """Names of the modules whose weights the backend really quantized (not merely loaded in full precision)."""
    if backend == "quanto":
        from optimum.quanto.nn import QModuleMixin

        return [name for name, module in model.named_modules() if isinstance(module, QModuleMixin)]
    import torch

    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        data = getattr(weight, "data", weight)
        # torchao swaps the weight for a tensor subclass; bitsandbytes stores int8 (or packed uint8) weights.
        if isinstance(data, torch.Tensor) and (
            type(data) is not torch.Tensor or data.dtype in (torch.int8, torch.uint8)
        ):
            names.append(name)
    return names


def _save_with_module_names(model: PreTrainedModel, folder: Path) -> None:
    """Rewrite a quanto save under the in-memory module names quanto reloads by.

    transformers 5 renames some modules on load and back on save (GPT-NeoX's `embed_out` is
    `lm_head` in memory), while quanto's reload matches the file's keys to the in-memory names
    without that mapping; the head would be left uninitialised. A saved module prefix is renamed
    only where its weight equals the in-memory module's exactly.
    """
    import torch
    from safetensors.torch import load_file, save_file

    for file in sorted(folder.glob("*.safetensors")):
        saved = load_file(file)
        memory = {k: v for k, v in model.state_dict().items() if k not in saved}
        renames: dict[str, str] = {}
        for key in saved:
            if key in memory or not key.endswith(".weight._data"):
                continue
            prefix = key[: -len(".weight._data")]
            for other, tensor in memory.items():
                if other.endswith(".weight._data") and tensor.shape == saved[key].shape:
                    if torch.equal(tensor.cpu(), saved[key]):
                        renames[prefix + "."] = other[: -len("weight._data")]
                        break
        if renames:
            renamed = {}
            for key, tensor in saved.items():
                old = next((p for p in renames if key.startswith(p)), None)
                renamed[renames[old] + key[len(old) :] if old else key] = tensor
            save_file(renamed, file, metadata={"format": "pt"})


def quantize_and_save(
    checkpoint: str, output_dir: Path, method: str, backend: str, dtype: str, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Quantize `checkpoint`, save it (weights + quantization.json) into `output_dir`; return the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.quantized import QUANTIZATION_FILE

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
        _save_with_module_names(quantized, output_dir)
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


def verify_reload(model: PreTrainedModel, path: Path, tolerance: float = RELOAD_TOLERANCE) -> float:
    """Reload `path` and compare its logits with `model`'s; raise when they differ (a broken format)."""
    import torch

    from rlhf.quantized import load_quantized

    probe = torch.arange(2, min(model.config.vocab_size, 34)).unsqueeze(0)
    with torch.no_grad():
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
    from rlhf.artifacts import atomic_output_dir, check_output_dir, write_json
    from rlhf.modeling import check_model_source, load_causal_lm, load_tokenizer
    from rlhf.quantized import check_quantization, load_quantized

    check_output_dir(output, "--output", inputs=(checkpoint,), writer="quantize")
    checkpoint = check_model_source(checkpoint, "CHECKPOINT")
    check_quantization(method, backend, dtype=dtype)
    check_quantizable(checkpoint, backend, trust_remote_code)
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=checkpoint), trust_remote_code)

    report: dict[str, Any] = {"command": "quantize", "method": method, "backend": backend}
    report["size_bytes_before"] = weights_size_bytes(checkpoint)
    if not no_eval:
        original = load_causal_lm(ModelConfig(model_name_or_path=checkpoint), trust_remote_code)
        report["before"] = quality_report(original, tokenizer)
        del original

    with atomic_output_dir(output) as tmp:
        quantized = quantize_and_save(checkpoint, tmp, method, backend, dtype, trust_remote_code)
        report["quantized_modules"] = len(quantized_modules(quantized, backend))
        if not report["quantized_modules"]:  # a model left in full precision must never look like a success
            raise RecipeError(
                f"--backend {backend}: no layer of {checkpoint} was quantized; nothing was written. "
                "Try another --backend."
            )
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
    parser.add_argument(  # the choices are rlhf.quantized.DTYPES, checked there (not imported for --help)
        "--dtype", default="float32", help="dtype of the unquantized tensors: bfloat16, float16, float32"
    )
    parser.add_argument("--output", required=True, help="output checkpoint directory")
    parser.add_argument("--no-eval", action="store_true", help="skip the quality measurements")
    parser.add_argument("--trust-remote-code", action="store_true")
    return quantize(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
