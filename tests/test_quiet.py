"""Commands print what matters: their own lines, the trainers' logs and progress bars; library noise stays hidden
unless asked for (`--verbose`, RLHF_VERBOSE=1); `--help` answers without importing torch."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rlhf import quiet
from rlhf.cli import main
from tests.conftest import write_recipe

REPO = Path(__file__).resolve().parents[1]
RLHF = [sys.executable, "-m", "rlhf.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop(quiet.VERBOSE_ENV, None)

# What a command may print on stderr: progress bars (tqdm's, datasets' and our eval bars, and the cursor
# moves and blanks between them), the trainers' log dicts, and rlhf's own warnings and notes.
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ALLOWED = re.compile(r"^(\{'|(warning|note): )")


def unexpected_stderr(stderr: str) -> list[str]:
    """The stderr lines outside the allow-list (each line's last carriage-return segment is what shows)."""
    lines = []
    for line in stderr.split("\n"):
        segments = [s for s in ANSI.sub("", line).split("\r") if s.strip()]
        if all(PROGRESS_BAR.search(s) for s in segments):
            continue
        if not ALLOWED.match(segments[-1].strip()):
            lines.append(segments[-1])
    return lines


def test_a_stage_and_an_eval_print_only_their_own_lines_on_stderr(tiny_checkpoint, tmp_path):
    out = tmp_path / "sft"
    overrides = ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(out)]
    overrides += ["--max_steps", "2", "--synthetic_num_examples", "64"]
    train = subprocess.run(
        [*RLHF, "train", "recipes/tiny/sft.yaml", *overrides],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert unexpected_stderr(train.stderr) == [], train.stderr[-3000:]
    assert "Setting accelerator to CPU" not in train.stdout

    sizes = ["--num_prompts", "8", "--num_preference_pairs", "8", "--num_perplexity_texts", "8"]
    evaluation = subprocess.run(
        [*RLHF, "eval", str(out), "--recipe", "recipes/tiny/eval.yaml", "--output", str(tmp_path / "eval"), *sizes],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert unexpected_stderr(evaluation.stderr) == [], evaluation.stderr[-3000:]
    # Progress: a bar per checkpoint over its sections, one per section over its batches; then one summary line.
    assert "eval sft:" in evaluation.stderr and "sft · generation:" in evaluation.stderr
    assert evaluation.stdout.strip().splitlines()[-1].startswith("evaluated 1 checkpoint on 8 sections in ")


def test_the_allow_list_catches_library_noise():
    noise = (
        "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library\n"
        "W1207 18:34:01.853000 3744 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass\n"
    )
    bars = "Map: 100%|██████████| 3000/3000 [00:00<00:00, 23086.81 examples/s]\r\n\x1b[A   \x1b[A\n{'loss': '5.794'}\n"
    assert len(unexpected_stderr(noise + bars)) == 2


HEAVY = ("torch", "transformers", "datasets", "peft", "deepspeed")
PROBE = f"""
import sys
from rlhf.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("heavy:", *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
"""


def imported_by(argv: list[str], env: dict[str, str]) -> tuple[list[str], str]:
    """The heavy libraries `rlhf ARGV` imported, and what it printed."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1].split()[1:], result.stdout


@pytest.mark.parametrize(
    "command",
    ["eval", "plan", "tiny-checkpoint", "pipeline", "attention", "quantize", "prune", "merge", "export", "chat"]
    + ["generate", "publish", "train", "ifeval-prompts", "best-of-n"],
)
def test_command_help_imports_no_heavy_library(command):
    heavy, printed = imported_by([command, "--help"], ENV)
    assert heavy == [] and "usage: rlhf" in printed


def test_recipe_help_is_kept_and_then_answers_without_torch(tmp_path):
    env = {**ENV, "RLHF_CACHE": str(tmp_path / "cache")}
    _, first = imported_by(["train", "recipes/tiny/sft.yaml", "--help"], env)  # builds the list: imports TRL
    heavy, second = imported_by(["train", "recipes/tiny/sft.yaml", "--help"], env)
    assert heavy == [] and second == first
    assert "activation_checkpointing: bool | None" in first and "dataset_name: str | None" in first


def test_noise_filters_hide_only_the_named_lines_unless_verbose(monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    quiet.install()
    torchao = logging.getLogger("torchao")

    def passes(logger: logging.Logger, message: str) -> bool:
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, None, None)
        return all(f.filter(record) for f in logger.filters)

    def warned() -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn(
                "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
            )
        return bool(caught)

    assert not passes(torchao, "Failed to load /x/_C_mxfp8.so: Could not load this library")
    assert passes(torchao, "Skipping import of cpp extensions due to incompatible torch version")
    assert not passes(logging.getLogger("DeepSpeed"), "Setting accelerator to CPU. If you have GPU ...")
    assert not warned()
    try:
        main(["--verbose", "--help"])  # as `rlhf --verbose <command>` does before running the command
        assert os.environ[quiet.VERBOSE_ENV] == "1"  # inherited by the processes a command starts
        assert passes(torchao, "Failed to load /x/_C_mxfp8.so: Could not load this library")
        assert warned()
    finally:
        monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
        quiet.install()


def test_old_checkpointing_names_are_read_as_the_current_ones_without_a_warning(tiny_checkpoint, tmp_path):
    from rlhf.stages import sft

    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        output_dir=str(tmp_path / "out"),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = sft.parse([str(recipe)])
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert parsed.training.activation_checkpointing is True
    assert parsed.training.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert "gradient_checkpointing" not in parsed.resolved and parsed.resolved["activation_checkpointing"] is True
    assert parsed.training.dataloader_pin_memory is False  # no GPU here: nothing to pin for
