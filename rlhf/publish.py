"""Write a model card for an output directory and push it to the Hugging Face Hub.

rlhf publish outputs/tiny/sft --repo-id me/tiny-sft --dry-run   # writes README.md, lists files, no network
rlhf publish outputs/tiny/sft --repo-id me/tiny-sft --private   # token from --token, HF_TOKEN or `hf auth login`

Only the files a model repo needs are uploaded (ALLOW_PATTERNS: safetensors weights, configs,
tokenizer files, the card and rlhf's records); everything else in the folder (checkpoints, pickles,
optimizer state, a stray `.env` or key) stays local and is listed as skipped.

A stage whose recipe sets `push_to_hub: true` (with `hub_model_id`, optionally `hub_private_repo`,
`hub_token`) publishes its finished output directory the same way, once, from
rlhf.artifacts.finish_stage. The Trainer's own pushing (repo creation at start-up, a push per
checkpoint) is switched off by rlhf.recipe.parse_recipe, so nothing half-trained reaches the Hub.
"""

from __future__ import annotations

import argparse
import json
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    constants,
    get_token,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id

from rlhf.config import RecipeError
from rlhf.model_card import build_model_card, read_recipe, redacted

# The only files publish uploads. An output folder also holds checkpoints, pickles, optimizer state
# and whatever else landed there (a `.env`, a key, a wandb folder): an allow-list uploads none of it.
# A pattern matches at its own depth only: `*.safetensors` never matches checkpoint-20/model.safetensors.
ALLOW_PATTERNS = (
    # weights (sharded ones with their index) and LoRA adapters, safetensors only
    "*.safetensors",
    "*.safetensors.index.json",
    "adapter_config.json",
    "config.json",
    "generation_config.json",
    "quanto_qmap.json",  # which layers `rlhf quantize --backend quanto` quantized: needed to reload
    # tokenizer
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
    # the card and the records it is built from
    "README.md",
    "metrics.json",
    "eval.json",
    "eval/eval.json",
    "lineage.json",
    "recipe.yaml",
    "quantization.json",
    "compress_report.json",
    "*.png",
    "plots/*.png",
)


def is_publishable(name: str) -> bool:
    """Whether a path relative to the output folder is on the allow-list."""
    return any(name.count("/") == pattern.count("/") and fnmatchcase(name, pattern) for pattern in ALLOW_PATTERNS)


def _all_files(output_dir: Path) -> list[str]:
    return sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())


def _inside(path: Path, folder: Path) -> bool:
    """False for a link that points out of the folder (an allowed name must not upload another file)."""
    return path.resolve().is_relative_to(folder.resolve())


def files_to_upload(output_dir: str | Path) -> list[str]:
    """Relative paths of the files publish uploads: those on ALLOW_PATTERNS."""
    output_dir = Path(output_dir)
    return [n for n in _all_files(output_dir) if is_publishable(n) and _inside(output_dir / n, output_dir)]


def skipped_files(output_dir: str | Path) -> list[str]:
    """Relative paths of the files publish leaves local."""
    uploaded = set(files_to_upload(output_dir))
    return [name for name in _all_files(Path(output_dir)) if name not in uploaded]


def describe_skipped(skipped: list[str]) -> str:
    """`skipped N files …: a, dir/ (3 files), …`, each folder collapsed to its top-level name."""
    counts: dict[str, int] = {}
    for name in skipped:
        top = name.split("/", 1)[0] + ("/" if "/" in name else "")
        counts[top] = counts.get(top, 0) + 1
    entries = [f"{top} ({n} files)" if top.endswith("/") and n > 1 else top for top, n in counts.items()]
    return f"skipped {len(skipped)} files not on the publish allow-list: {', '.join(entries)}"


def _upload_content(path: Path) -> str | bytes:
    """What to upload for `path`: the file itself, or a copy with secrets redacted (older outputs held tokens)."""
    if path.suffix not in (".json", ".yaml") or path.stat().st_size > 2**20:
        return str(path)
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError):
        return str(path)
    clean = redacted(data)
    if clean == data:
        return str(path)
    if path.suffix == ".json":
        return (json.dumps(clean, indent=2) + "\n").encode()
    return yaml.safe_dump(clean, sort_keys=False).encode()


def check_publishable(output_dir: str | Path, repo_id: str) -> None:
    """Fail early, with the fix, on a folder that is not a finished output or a malformed repo id."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise RecipeError(f"OUTPUT_DIR: {str(output_dir)!r} does not exist; pass a finished stage or export folder.")
    if not ((output_dir / "config.json").is_file() or (output_dir / "adapter_config.json").is_file()):
        raise RecipeError(
            f"OUTPUT_DIR: {str(output_dir)!r} holds no config.json or adapter_config.json; "
            "publish a finished stage output or an `rlhf export` folder."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise RecipeError(f"--repo-id: {repo_id!r} is not a valid Hub repo id ({error}); use `user/name`.") from None


def publish(
    output_dir: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    dry_run: bool = False,
    license: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> list[str]:
    """Write README.md (the model card) into `output_dir`, then create the repo and upload; return the files."""
    check_publishable(output_dir, repo_id)
    output_dir = Path(output_dir)
    if not dry_run:
        token = token or get_token()
        if not token:
            raise RecipeError(
                "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login` "
                f"(or use --dry-run to only write the card); {output_dir} is unchanged."
            )
        if constants.is_offline_mode():
            raise RecipeError(
                "HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it to publish "
                f"(or use --dry-run); {output_dir} is unchanged."
            )
    card = build_model_card(output_dir, repo_id, license)
    card.save(output_dir / "README.md")
    files = files_to_upload(output_dir)
    if dry_run:
        return files
    api = HfApi(endpoint=endpoint, token=token)
    operations = [CommitOperationAdd(name, _upload_content(output_dir / name)) for name in files]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=commit_message or f"Upload {output_dir.name} with rlhf")
    except Exception as error:  # network, auth and Hub errors all mean the same to the user: not published
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(
            f"publishing {output_dir} to {api.endpoint}/{repo_id} failed ({type(error).__name__}: {reason}); "
            "the local output is intact — check the token, the repo id and the connection (HF_ENDPOINT), then "
            f"rerun `rlhf publish {output_dir} --repo-id {repo_id}`."
        ) from None
    return files


def publish_if_requested(output_dir: str | Path, training_args: Any, token: str | None = None) -> bool:
    """Publish a finished stage output when its recipe asked for push_to_hub; report a failure, never raise.

    `token` is the recipe's hub_token (rlhf.config.Recipe.hub_token); without one, HF_TOKEN or the saved login.
    """
    requested = bool(getattr(training_args, "push_to_hub", False)) or bool(read_recipe(output_dir).get("push_to_hub"))
    if not requested:
        return False
    repo_id = getattr(training_args, "hub_model_id", None) or Path(output_dir).name
    try:
        files = publish(
            output_dir,
            repo_id,
            private=getattr(training_args, "hub_private_repo", None),
            token=token or getattr(training_args, "hub_token", None),
        )
    except RecipeError as error:
        print(f"push_to_hub: {error}", file=sys.stderr)
        return False
    print(f"push_to_hub: uploaded {len(files)} files from {output_dir} to {repo_id}")
    skipped = skipped_files(output_dir)
    if skipped:
        print(f"push_to_hub: {describe_skipped(skipped)}")
    return True


def main(argv: list[str] | None = None) -> list[str]:
    """`rlhf publish OUTPUT_DIR --repo-id NAME [--private] [--dry-run] [--token T]`."""
    parser = argparse.ArgumentParser(prog="rlhf publish", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a finished stage output or an `rlhf export` folder")
    parser.add_argument("--repo-id", required=True, help="user/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="write the card and list the files; no network")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--license", help="license id for the card, e.g. apache-2.0")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--commit-message")
    args = parser.parse_args(argv)
    files = publish(
        args.output_dir,
        args.repo_id,
        args.private or None,  # unset: the Hub's (or the organisation's) default visibility
        args.token,
        args.dry_run,
        args.license,
        args.endpoint,
        args.commit_message,
    )
    card = Path(args.output_dir) / "README.md"
    if args.dry_run:
        print(f"wrote {card}; would upload {len(files)} files to {args.repo_id}:")
        for name in files:
            print(f"  {name} ({(Path(args.output_dir) / name).stat().st_size:,} bytes)")
    else:
        print(f"uploaded {len(files)} files from {args.output_dir} to {args.repo_id}")
    skipped = skipped_files(args.output_dir)
    if skipped:
        print(describe_skipped(skipped))
    return files


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
