"""Ship a checkpoint: merge adapters, export a clean inference folder, chat with it, batch-generate.

rlhf merge outputs/sft-lora --output outputs/sft-merged
rlhf export outputs/tiny/sft --output outputs/tiny/export --dtype bfloat16 --max-shard-size 2GB
rlhf export outputs/tiny/sft --format gguf --outtype q8_0 --output outputs/tiny/model.q8_0.gguf
rlhf chat outputs/tiny/export --system "You are a helpful assistant."
rlhf generate outputs/tiny/export --input prompts.jsonl --output responses.jsonl --temperature 0.7 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import ModelConfig

from rlhf.config import RecipeError

if TYPE_CHECKING:  # torch, transformers and the loaders load inside the commands, not for --help
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("float32", "bfloat16", "float16")
LOAD_TIME_KEYS = ("is_local", "local_files_only")


def check_checkpoint(path: str, base: str | None = None, field: str = "CHECKPOINT") -> str:
    """Fail early, with the fix, when a checkpoint (or an adapter's base) cannot be loaded; returns the path to load."""
    from rlhf.checkpoint_files import adapter_base, is_adapter_dir
    from rlhf.modeling import check_model_source

    if is_adapter_dir(path):
        check_model_source(adapter_base(path, base), field="--base (or the adapter's base_model_name_or_path)")
        return path
    return check_model_source(path, field=field)


def load_for_inference(
    checkpoint: str, dtype: str | None = None, base: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a full checkpoint, or an adapter merged into its base, with a ready tokenizer, in eval mode."""
    from rlhf.checkpoint_files import adapter_base, is_adapter_dir
    from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer

    checkpoint = check_checkpoint(checkpoint, base)
    model_path = adapter_base(checkpoint, base) if is_adapter_dir(checkpoint) else checkpoint
    model = load_causal_lm(
        ModelConfig(model_name_or_path=checkpoint, dtype=dtype or "auto"), trust_remote_code, base=base
    )
    # Stage outputs save the tokenizer next to the adapter; fall back to the base's.
    tokenizer_path = checkpoint if (Path(checkpoint) / "tokenizer_config.json").exists() else model_path
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=tokenizer_path), trust_remote_code)
    align_generation_config(model, tokenizer)
    model.eval()
    return model, tokenizer


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Atomically write model (safetensors, sharded above `max_shard_size`), tokenizer, chat template, generation config."""
    import torch

    from rlhf.artifacts import atomic_output_dir

    if dtype:
        model = model.to(getattr(torch, dtype))
    with atomic_output_dir(output_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        # transformers 5 records how this copy was loaded (is_local, local_files_only: true when
        # offline); a shipped folder should not tell whoever loads it to stay offline.
        config_file = tmp / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            if any(key in config for key in LOAD_TIME_KEYS):
                config = {k: v for k, v in config.items() if k not in LOAD_TIME_KEYS}
                config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return Path(output_dir)


def merge(
    adapter_dir: str,
    output: str | Path,
    base: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    trust_remote_code: bool = False,
) -> Path:
    """Fold a LoRA/DoRA adapter into its base model and save the result to `output`."""
    from rlhf.checkpoint_files import ADAPTER_CONFIG, is_adapter_dir

    if not is_adapter_dir(adapter_dir):
        raise RecipeError(
            f"ADAPTER_DIR: {adapter_dir!r} has no {ADAPTER_CONFIG}; point it at a PEFT stage output "
            "(a recipe with use_peft: true), or use `rlhf export` for a full checkpoint."
        )
    return export(adapter_dir, output, dtype, max_shard_size, base, trust_remote_code)


def merge_main(argv: list[str] | None = None) -> Path:
    """`rlhf merge ADAPTER_DIR --output DIR [--base BASE]`: fold a LoRA/DoRA adapter into its base model."""
    parser = argparse.ArgumentParser(prog="rlhf merge", description=merge_main.__doc__)
    parser.add_argument("adapter_dir")
    parser.add_argument("--output", required=True)
    parser.add_argument("--base", help="base checkpoint (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the saved weights (default: the base's)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--trust-remote-code", action="store_true")
    return merge(**vars(parser.parse_args(argv)))


def export(
    checkpoint: str,
    output: str | Path,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    base: str | None = None,
    trust_remote_code: bool = False,
    format: str = "safetensors",
    outtype: str = "f16",
) -> Path:
    """Write `checkpoint` to `output` as a self-contained inference folder (adapters merged, no training files)."""
    from rlhf.artifacts import check_output_dir

    if format == "gguf":
        return export_gguf(checkpoint, output, outtype, base, trust_remote_code)
    check_output_dir(output, "--output", inputs=(checkpoint,), writer="export")
    # Re-saving through save_pretrained (rather than copying files) is what leaves metrics, trainer
    # state, optimizer files and pickled arguments behind, and writes standard safetensors shards.
    model, tokenizer = load_for_inference(checkpoint, None, base, trust_remote_code)
    path = save_checkpoint(model, tokenizer, output, dtype, max_shard_size)
    print(f"exported {checkpoint} → {path} ({', '.join(sorted(os.listdir(path)))})")
    return path


def export_gguf(
    checkpoint: str, output: str | Path, outtype: str = "f16", base: str | None = None, trust_remote_code: bool = False
) -> Path:
    """Write `checkpoint` (adapters merged) as one GGUF file llama.cpp-family tools read."""
    from transformers import AutoConfig

    from rlhf.checkpoint_files import adapter_base, is_adapter_dir
    from rlhf.gguf import OUTTYPES, check_writable, write_gguf

    output = Path(output)
    if output.suffix != ".gguf":
        raise RecipeError(f"--output: {str(output)!r} should name a .gguf file for --format gguf (e.g. model.gguf).")
    if output.exists():
        raise RecipeError(f"--output: {output} exists; remove it or pick another file name (exports never overwrite).")
    if outtype not in OUTTYPES:
        raise RecipeError(f"--outtype: got {outtype!r}, expected one of {', '.join(OUTTYPES)}.")
    loadable = check_checkpoint(checkpoint, base)
    config_source = adapter_base(loadable, base) if is_adapter_dir(loadable) else loadable
    check_writable(AutoConfig.from_pretrained(config_source, trust_remote_code=trust_remote_code))
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=output.name + ".") as staging:
        model, tokenizer = load_for_inference(loadable, None, base, trust_remote_code)
        save_checkpoint(model, tokenizer, Path(staging) / "model", "float32", "50GB")
        written = write_gguf(Path(staging) / "model", output, outtype)
    types = ", ".join(f"{count} {name}" for name, count in sorted(written["tensor_types"].items()))
    print(f"exported {checkpoint} → {output} (GGUF {outtype}: {types}; {written['bytes'] / 2**20:.1f} MiB)")
    return output


def export_main(argv: list[str] | None = None) -> Path:
    """`rlhf export CHECKPOINT --output DIR`: a self-contained inference folder (adapters merged, no training files)."""
    parser = argparse.ArgumentParser(prog="rlhf export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a stage output, a save_pretrained folder or an adapter folder")
    parser.add_argument("--output", required=True, help="a folder (safetensors) or a .gguf file (--format gguf)")
    parser.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors")
    parser.add_argument("--outtype", choices=("f16", "q8_0", "f32"), default="f16", help="GGUF tensor type")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the saved weights (default: unchanged)")
    parser.add_argument("--max-shard-size", default="5GB", help="split weights into shards of at most this size")
    parser.add_argument("--base", help="for an adapter: its base checkpoint (default: from adapter_config.json)")
    parser.add_argument("--trust-remote-code", action="store_true")
    return export(**vars(parser.parse_args(argv)))


def _chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], budget: int | None
) -> tuple[torch.Tensor, list[dict]]:
    """Template the conversation, dropping the oldest turns until it fits `budget` tokens."""
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        first = 1 if messages[0]["role"] == "system" else 0
        if budget is None or ids.shape[1] <= budget or len(messages) - first <= 1:
            return ids, messages
        messages = messages[:first] + messages[first + 2 :]
        print("[history trimmed to fit the context window]", file=sys.stderr)


def chat_main(argv: list[str] | None = None) -> None:
    """`rlhf chat CHECKPOINT`: chat on stdin/stdout, streaming tokens; /reset clears history, /exit or EOF quits."""
    parser = argparse.ArgumentParser(prog="rlhf chat", description=chat_main.__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--system", help="system prompt placed before every conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", help="for an adapter: its base checkpoint")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    import torch
    from transformers import TextStreamer

    from rlhf.modeling import eos_token_ids

    model, tokenizer = load_for_inference(args.checkpoint, None, args.base, args.trust_remote_code)
    torch.manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    stop_ids = eos_token_ids(model, tokenizer)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    budget = max_positions - args.max_new_tokens if max_positions else None
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    if interactive:
        print(f"chatting with {args.checkpoint}: /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(start)
            print("[history cleared]", file=sys.stderr)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        input_ids, messages = _chat_prompt_ids(tokenizer, messages, budget)
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=torch.ones_like(input_ids).to(model.device),
                max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else None,
                top_p=args.top_p if args.temperature > 0 else None,
                top_k=None,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
            )
        reply = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})


def read_prompts(path: str) -> list[tuple[dict, Any]]:
    """Rows of a jsonl file with their prompt: `prompt` (text or messages) or `messages` (a trailing answer dropped)."""
    if not os.path.isfile(path):
        raise RecipeError(f'--input: {path!r} not found; pass a .jsonl file with one {{"prompt": ...}} per line.')
    rows: list[tuple[dict, Any]] = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecipeError(f"--input {path} line {number}: not valid JSON ({error.msg}).") from None
            prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
            if isinstance(prompt, list) and prompt and prompt[-1].get("role") == "assistant":
                prompt = prompt[:-1]  # a full conversation: answer its last user turn afresh
            valid_messages = (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt)
            )
            if not (isinstance(prompt, str) or valid_messages):
                raise RecipeError(
                    f"--input {path} line {number}: needs a `prompt` column (text or a list of "
                    '{"role", "content"} messages) or a `messages` column; '
                    f"found columns {sorted(row) if isinstance(row, dict) else type(row).__name__}."
                )
            rows.append((row, prompt))
    if not rows:
        raise RecipeError(f"--input {path}: no rows; add one JSON object per line.")
    return rows


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write rows to `path` via a temporary file and a rename, so a killed run leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def generate_main(argv: list[str] | None = None) -> Path:
    """`rlhf generate CHECKPOINT --input prompts.jsonl --output out.jsonl`: batched, seeded generation."""
    parser = argparse.ArgumentParser(prog="rlhf generate", description=generate_main.__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--input", required=True, help="jsonl rows with `prompt` (text or messages) or `messages`")
    parser.add_argument("--output", required=True, help="jsonl: each input row plus `response` (or `responses`)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-return-sequences", type=int, default=1)
    parser.add_argument("--base", help="for an adapter: its base checkpoint")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    from rlhf.evaluation.generation import generate_responses

    rows = read_prompts(args.input)
    if args.num_return_sequences > 1 and args.temperature <= 0:
        raise RecipeError("--num-return-sequences > 1 with greedy decoding repeats one answer; set --temperature > 0.")
    if args.batch_size < 1 or args.num_return_sequences < 1 or args.max_new_tokens < 1:
        raise RecipeError("--batch-size, --num-return-sequences and --max-new-tokens must be at least 1.")
    model, tokenizer = load_for_inference(args.checkpoint, None, args.base, args.trust_remote_code)

    n = args.num_return_sequences
    # Each prompt repeated n times in a row: with sampling, each copy is an independent draw.
    prompts = [prompt for _, prompt in rows for _ in range(n)]
    responses: list[str] = []
    sampling = args.temperature > 0
    for index, start in enumerate(
        tqdm(range(0, len(prompts), args.batch_size), desc="generating", unit="batch", file=sys.stderr)
    ):
        responses += generate_responses(
            model,
            tokenizer,
            prompts[start : start + args.batch_size],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            do_sample=sampling,
            temperature=args.temperature if sampling else 1.0,
            seed=args.seed + index,  # one seed per batch: same seed and batch size → same output
            top_p=args.top_p if sampling and args.top_p < 1.0 else None,
        )
    out_rows = [
        {**row, **({"response": responses[i * n]} if n == 1 else {"responses": responses[i * n : (i + 1) * n]})}
        for i, (row, _) in enumerate(rows)
    ]
    write_jsonl_atomic(args.output, out_rows)
    print(f"wrote {len(out_rows)} rows to {args.output}", file=sys.stderr)
    return Path(args.output)


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(export_main)
