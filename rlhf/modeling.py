"""Tokenizer and model loading, quantized checkpoints included: the one place that does it."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl import ModelConfig, get_quantization_config

from rlhf.config import RecipeError

# ChatML with the assistant turn (and its closing token, the EOS) wrapped in generation markers,
# so SFT's assistant_only_loss trains the model to emit the stop token.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


# Files that torch.load unpickles; unpickling can run arbitrary code, safetensors cannot.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Trainer and accelerate state saved beside the weights of a checkpoint; they never hold the model's
# weights, and resuming reads them with torch.load(weights_only=True).
TRAINING_STATE_FILES = (
    "training_args.bin",
    "optimizer*.pt",
    "optimizer*.bin",
    "scheduler*.pt",
    "scheduler*.bin",
    "scaler.pt",
    "sampler*.bin",
    "rng_state*.pth",
    "random_states_*.pkl",
    "custom_checkpoint_*.pkl",
)


def pickle_weight_files(names: Iterable[str]) -> list[str]:
    """The pickled weight files among a checkpoint's file names, when it has no safetensors to load instead."""
    names = list(names)
    if any(name.endswith(".safetensors") for name in names):
        return []  # loaders pass use_safetensors=True, so pickles beside safetensors are never read
    return sorted(
        name
        for name in names
        if name.endswith(PICKLE_SUFFIXES) and not any(fnmatchcase(name, state) for state in TRAINING_STATE_FILES)
    )


def refuse_pickle_weights(names: Iterable[str], where: str, field: str = "model_name_or_path") -> None:
    """RecipeError naming the file and the fix when a checkpoint's weights exist only as pickles."""
    pickles = pickle_weight_files(names)
    if pickles:
        raise RecipeError(
            f"{field}: {where}/{pickles[0]} holds pickled weights and there are no safetensors; loading a pickle "
            "can run code. Convert the checkpoint to safetensors (`save_pretrained` it where you trust it), or "
            "set `allow_pickle_weights: true` if you trust the source."
        )


def _local_files(folder: str | Path) -> list[str]:
    return [p.name for p in Path(folder).iterdir() if p.is_file()]


def check_model_source(name_or_path: str, field: str = "model_name_or_path", allow_pickle: bool = False) -> None:
    """Fail early, with the fix, when a checkpoint is missing, unreachable, or holds only pickled weights."""
    if os.path.isdir(name_or_path):
        if not (Path(name_or_path) / "config.json").exists():
            raise RecipeError(
                f"{field}: directory {name_or_path!r} has no config.json; point it at a saved checkpoint "
                "(a stage's output directory or a save_pretrained folder)."
            )
        if not allow_pickle:
            refuse_pickle_weights(_local_files(name_or_path), name_or_path, field)
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise RecipeError(
            f"{field}: path {name_or_path!r} does not exist; check the path or run the stage that writes it."
        )
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
        if isinstance(cached, str):  # in the local Hub cache: loads offline
            if not allow_pickle:
                refuse_pickle_weights(_local_files(Path(cached).parent), name_or_path, field)
            return
    except HFValidationError as error:
        raise RecipeError(
            f"{field}: {name_or_path!r} is neither a local directory nor a valid Hub id ({error})."
        ) from None
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RecipeError(
            f"{field}: {name_or_path!r} is not a local directory and not in the Hub cache, and HF_HUB_OFFLINE=1; "
            "download it first (huggingface-cli download) or use a local path."
        )
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(name_or_path, timeout=10)
    except Exception as error:  # any failure here means the load would fail later, after work was done
        raise RecipeError(
            f"{field}: cannot reach the Hugging Face Hub for {name_or_path!r} ({type(error).__name__}); "
            "check the id and your connection, set HF_ENDPOINT for a mirror, or use a local path."
        ) from None
    if not allow_pickle:
        top_level = [s.rfilename for s in info.siblings or [] if "/" not in s.rfilename]
        refuse_pickle_weights(top_level, name_or_path, field)


def _check_pickle_weights(model_args: ModelConfig) -> None:
    """Refuse a local checkpoint whose weights are only pickles, unless its recipe allows them."""
    path = model_args.model_name_or_path
    if not getattr(model_args, "allow_pickle_weights", False) and os.path.isdir(path):
        refuse_pickle_weights(_local_files(path), path)


def warn_remote_code(name_or_path: str | Path, trust_remote_code: bool) -> None:
    """One stderr line when a checkpoint is loaded with trust_remote_code, naming whose code runs."""
    if trust_remote_code:
        print(f"warning: trust_remote_code: runs code from {name_or_path}", file=sys.stderr)


def load_tokenizer(model_args: ModelConfig, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it ready for training: pad token, chat template, right padding."""
    warn_remote_code(model_args.model_name_or_path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        # Padding with EOS hides the stop token from the loss in some collators; prefer a distinct one.
        if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_init_kwargs(model_args: ModelConfig, trust_remote_code: bool = False) -> dict:
    """Keyword arguments for `from_pretrained` from a ModelConfig (dtype, attention, quantization)."""
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    kwargs = {
        "revision": model_args.model_revision,
        "dtype": dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": trust_remote_code,
        # Refuse pickles at load time too: a Hub id is only checked by check_model_source when online.
        "use_safetensors": None if getattr(model_args, "allow_pickle_weights", False) else True,
    }
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        if not torch.cuda.is_available():
            raise RecipeError(
                "load_in_4bit/load_in_8bit: bitsandbytes quantized training needs a CUDA GPU; "
                "remove the flag on CPU (use `rlhf quantize` for CPU inference)."
            )
        from trl import get_kbit_device_map

        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = get_kbit_device_map()
    return {k: v for k, v in kwargs.items() if v is not None}


def _config_with_dropout(model_args: ModelConfig, trust_remote_code: bool) -> dict:
    """`{"config": ...}` with every architecture dropout set to the recipe's `dropout`, or {} when unset."""
    dropout = getattr(model_args, "dropout", None)
    if dropout is None:
        return {}
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    names = [k for k, v in vars(config).items() if "dropout" in k and isinstance(v, float)]
    if not names:
        raise RecipeError(f"dropout: {type(config).__name__} has no dropout setting to change; remove `dropout`.")
    for name in names:
        setattr(config, name, dropout)
    return {"config": config}


def load_causal_lm(
    model_args: ModelConfig, trust_remote_code: bool = False, from_scratch: bool = False
) -> PreTrainedModel:
    """Load a causal LM (or initialise one from its config when `from_scratch`).

    A directory written by `rlhf quantize` loads through its quantization backend, so every command
    (eval, chat, generate) accepts quantized checkpoints too.
    """
    if (Path(model_args.model_name_or_path) / QUANTIZATION_FILE).exists():
        return load_quantized(
            model_args.model_name_or_path, trust_remote_code, getattr(model_args, "allow_pickle_weights", False)
        )
    _check_pickle_weights(model_args)
    warn_remote_code(model_args.model_name_or_path, trust_remote_code)
    kwargs = {**model_init_kwargs(model_args, trust_remote_code), **_config_with_dropout(model_args, trust_remote_code)}
    if from_scratch:
        config = kwargs.get("config") or AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=trust_remote_code
        )
        return AutoModelForCausalLM.from_config(
            config, attn_implementation=kwargs.get("attn_implementation"), trust_remote_code=trust_remote_code
        )
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)


def load_sequence_classifier(
    model_args: ModelConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int = 1, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a checkpoint with a (new or existing) scalar score head, e.g. a reward or value model."""
    _check_pickle_weights(model_args)
    warn_remote_code(model_args.model_name_or_path, trust_remote_code)
    kwargs = {**model_init_kwargs(model_args, trust_remote_code), **_config_with_dropout(model_args, trust_remote_code)}
    if "config" in kwargs:
        kwargs["config"].num_labels = num_labels
    else:
        kwargs["num_labels"] = num_labels
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def align_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make generation stop on the tokenizer's EOS and pad with its pad token."""
    if model.generation_config is None:
        model.generation_config = GenerationConfig()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id


def merge_adapters(trainer) -> bool:
    """Fold a trainer's LoRA/DoRA adapters (and modules_to_save heads) into the base weights before saving.

    The stage output then loads with a plain `from_pretrained`, as downstream stages expect.
    Returns whether anything was merged.
    """
    from peft import PeftModel

    if not isinstance(trainer.model, PeftModel):
        return False
    trainer.model = trainer.model.merge_and_unload()
    return True


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
        refuse_pickle_weights(_local_files(path), str(path))
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
