"""Tokenizer and model loading, quantized checkpoints included: the one place that does it."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from trl import ModelConfig, get_quantization_config

from rlhf.checkpoint_files import (
    adapter_base,
    is_adapter_dir,
    local_files,
    refuse_pickle_weights,
    warn_remote_code,
)
from rlhf.config import RecipeError
from rlhf.distributed import say_once
from rlhf.dropout import is_dropout_setting
from rlhf.gguf import gguf_checkpoint, is_gguf_source


def check_model_source(name_or_path: str, field: str = "model_name_or_path", allow_pickle: bool = False) -> str:
    """Fail early, with the fix, when a checkpoint is missing, unreachable, or holds only pickled weights.

    Returns the path to load: `name_or_path` itself, or for a `.gguf` file (or a `package:` spec) the
    plain safetensors checkpoint it converts to (once, cached).
    """
    if is_gguf_source(name_or_path):
        return gguf_checkpoint(name_or_path, field)
    if os.path.isdir(name_or_path):
        if is_adapter_dir(name_or_path) and not (Path(name_or_path) / "config.json").exists():
            # A LoRA stage output or a user's adapter: loads as its base with the adapter merged in.
            if not allow_pickle:
                refuse_pickle_weights(local_files(name_or_path), name_or_path, field)
            base = adapter_base(name_or_path)
            check_model_source(base, f"{field} (base_model_name_or_path of adapter {name_or_path})", allow_pickle)
            return name_or_path
        if not (Path(name_or_path) / "config.json").exists():
            raise RecipeError(
                f"{field}: directory {name_or_path!r} has no config.json; point it at a saved checkpoint "
                "(a stage's output directory or a save_pretrained folder)."
            )
        if not allow_pickle:
            refuse_pickle_weights(local_files(name_or_path), name_or_path, field)
        return name_or_path
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
                refuse_pickle_weights(local_files(Path(cached).parent), name_or_path, field)
            return name_or_path
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
    return name_or_path


def _check_pickle_weights(model_args: ModelConfig) -> None:
    """Refuse a local checkpoint whose weights are only pickles, unless its recipe allows them."""
    path = model_args.model_name_or_path
    if not getattr(model_args, "allow_pickle_weights", False) and os.path.isdir(path):
        refuse_pickle_weights(local_files(path), path)


# Tokens that end a text in common vocabularies; a tokenizer without an EOS gets the first one it has.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")


def plain_chat_template(eos_token: str) -> str:
    """rlhf's template for base models: `Role:` lines of plain text, each answer ended by the EOS.

    Built only from text and the tokenizer's own EOS, so every piece is in any vocabulary; the answer
    and its EOS sit inside `{% generation %}`, so assistant-only loss trains the model to stop. The
    prompt ends in a newline, so a completion tokenises the same alone as after its prompt.
    """
    eos = eos_token.replace("\\", "\\\\").replace("'", "\\'")
    return (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{ 'Assistant:\\n' }}{% generation %}{{ message['content'] + '" + eos + "' }}{% endgeneration %}{{ '\\n\\n' }}"
        "{%- else %}"
        "{{ message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ 'Assistant:\\n' }}{%- endif %}"
    )


def _ensure_eos(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Give a tokenizer without an EOS one: an end-of-text token its vocabulary has, else a new special token."""
    if tokenizer.eos_token is not None:
        return
    vocab = tokenizer.get_vocab()
    found = next((token for token in END_OF_TEXT_TOKENS if token in vocab), None)
    if found is not None:
        tokenizer.eos_token = found
        say_once(
            f"note: {source} sets no EOS token; using {found!r} from its vocabulary.",
            key=f"eos:{source}",
            stream=sys.stderr,
        )
    else:
        # New special token: align_generation_config resizes the model's embeddings to match.
        tokenizer.add_special_tokens({"eos_token": END_OF_TEXT_TOKENS[0]})
        say_once(
            f"note: {source} has no EOS token; added {END_OF_TEXT_TOKENS[0]!r} as a new special token "
            "(the model's embeddings grow by one row).",
            key=f"eos:{source}",
            stream=sys.stderr,
        )


def is_encoder(config: PreTrainedConfig) -> bool:
    """Whether a checkpoint is a bidirectional encoder (BERT, RoBERTa, DeBERTa, ModernBERT, ...), not a causal LM.

    `is_decoder` alone cannot tell (a Llama config leaves it False): an encoder is a model type with a
    masked-LM architecture, not configured as a decoder and not an encoder-decoder (BART reads its EOS).
    A remote-code model is judged by the architectures its checkpoint was saved with.
    """
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return True
    return any(name.endswith("ForMaskedLM") for name in getattr(config, "architectures", None) or [])


def _is_encoder_checkpoint(source: str, revision: str | None, trust_remote_code: bool) -> bool:
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # a tokenizer-only folder: nothing says it is an encoder
        return False
    return is_encoder(config)


def load_tokenizer(model_args: ModelConfig, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it ready for training: EOS, pad token, chat template.

    A base model's tokenizer often has no chat template (GPT-2, OPT, Pythia) or no EOS (Pythia):
    it gets an EOS from its own vocabulary and `plain_chat_template`, announced once.
    An adapter folder without tokenizer files uses its base's tokenizer.
    """
    source = model_args.model_name_or_path
    if is_adapter_dir(source) and not (Path(source) / "tokenizer_config.json").exists():
        source = adapter_base(source)
    warn_remote_code(source, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    if _is_encoder_checkpoint(source, model_args.model_revision, trust_remote_code):
        return tokenizer  # an encoder reads (prompt, response) as its native pair: no EOS, no chat template
    _ensure_eos(tokenizer, source)
    if tokenizer.pad_token is None:
        # Padding with EOS hides the stop token from the loss in some collators; prefer a distinct one.
        if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = plain_chat_template(tokenizer.eos_token)
        say_once(
            f'note: {source} has no chat template; using rlhf\'s plain one ("User:" / "Assistant:" lines, '
            f"each answer ended by {tokenizer.eos_token!r}). Save a `chat_template` with the tokenizer to use yours.",
            key=f"template:{source}",
            stream=sys.stderr,
        )
    return tokenizer


def check_trainable_chat_template(
    model_args: ModelConfig, chat_template_path: str | None = None, trust_remote_code: bool = False
) -> None:
    """For assistant-only loss: refuse, before any model loads, a template whose assistant turns cannot be masked."""
    from rlhf.data.assistant_mask import check_maskable

    source = model_args.model_name_or_path
    if not os.path.isdir(source):
        return  # a Hub id: TRL checks it at training time
    tokenizer = load_tokenizer(model_args, trust_remote_code)
    where = f"the chat template of {source}"
    if chat_template_path:
        path = Path(chat_template_path)
        if path.is_file():
            tokenizer.chat_template = path.read_text()
        elif path.is_dir():
            tokenizer.chat_template = AutoTokenizer.from_pretrained(path).chat_template
        where = f"the chat template in {chat_template_path}"
    check_maskable(tokenizer, where=where)


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
    names = [k for k, v in vars(config).items() if is_dropout_setting(k) and isinstance(v, float)]
    if not names:
        raise RecipeError(f"dropout: {type(config).__name__} has no dropout setting to change; remove `dropout`.")
    for name in names:
        setattr(config, name, dropout)
    return {"config": config}


def load_causal_lm(
    model_args: ModelConfig, trust_remote_code: bool = False, from_scratch: bool = False, base: str | None = None
) -> PreTrainedModel:
    """Load a causal LM (or initialise one from its config when `from_scratch`).

    A directory written by `rlhf quantize` loads through its quantization backend, so every command
    (eval, chat, generate) accepts quantized checkpoints too. An adapter folder loads as its base (`base`,
    else the one its adapter_config.json names) with the adapter merged in.
    """
    from rlhf.quantized import QUANTIZATION_FILE, load_quantized

    if (Path(model_args.model_name_or_path) / QUANTIZATION_FILE).exists():
        return load_quantized(
            model_args.model_name_or_path, trust_remote_code, getattr(model_args, "allow_pickle_weights", False)
        )
    _check_pickle_weights(model_args)
    if is_adapter_dir(model_args.model_name_or_path) and not from_scratch:
        from peft import PeftModel

        adapter = model_args.model_name_or_path
        base_path = adapter_base(adapter, base)
        base_model = load_causal_lm(dataclasses.replace(model_args, model_name_or_path=base_path), trust_remote_code)
        say_once(
            f"note: {adapter} is an adapter; merged into {base_path}.",
            key=f"adapter:{adapter}",
            stream=sys.stderr,
        )
        # merge_and_unload folds B·A (and DoRA's magnitude) into each weight: a plain model from here on.
        return PeftModel.from_pretrained(base_model, adapter).merge_and_unload()
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


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a response: the generation config's EOS ids plus the tokenizer's EOS."""
    config = model.generation_config
    ids = config.eos_token_id if config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def align_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make generation stop on every EOS (the config's and the tokenizer's) and pad with the tokenizer's pad.

    A checkpoint's EOS list is kept whole (Qwen2 ends on `<|im_end|>` or `<|endoftext|>`, Llama-3 on
    `<|eot_id|>` or `<|end_of_text|>`), and an EOS the config names is never replaced by None.
    Embeddings grow when load_tokenizer added a token.
    """
    embeddings = model.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.generation_config is None:
        model.generation_config = GenerationConfig()
    stop_ids = eos_token_ids(model, tokenizer)
    model.generation_config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else (stop_ids or None)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "eos_token_id", None) is None:
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
