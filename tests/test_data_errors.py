"""Messy data files: a bad row is named by file and line (or skipped and counted), every drop is said once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from rlhf.config import DataArguments, RecipeError
from rlhf.data import prepare_datasets

SFT_LINES = [json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) for i in range(6)]
PAIR_LINES = [json.dumps({"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) for i in range(6)]
SKIP_HINT = "; fix the line or set skip_bad_rows: true to skip such rows."


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def prepare(path: Path, target: str = "sft", **data: object) -> tuple[Dataset, Dataset | None, dict]:
    return prepare_datasets(DataArguments(dataset_name=str(path), test_split_size=0.0, **data), target, 0)


def data_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"prompt": "q" "completion": "a"}', "not valid JSON (Expecting ',' delimiter)"),
        (b'{"prompt": "caf\xe9", "completion": "a"}', "not UTF-8 (byte 0xe9 at column 16; re-save the file as UTF-8)"),
        (
            '["prompt", "completion"]',
            'expected one JSON object ({...}) per line, got a list (["prompt", "completion"])',
        ),
    ],
    ids=["malformed", "non-utf8", "not-an-object"],
)
def test_unreadable_line_is_named_then_skipped(tmp_path, capsys, bad_line, problem):
    path = write_lines(tmp_path / "train.jsonl", [*SFT_LINES[:3], bad_line, *SFT_LINES[3:]])
    with pytest.raises(RecipeError) as error:
        prepare(path)
    assert str(error.value) == f"dataset_name: {path} line 4: {problem}{SKIP_HINT}"

    train, _, report = prepare(path, skip_bad_rows=True)
    assert len(train) == 6
    assert report["cleaning"]["skipped_bad_rows"] == 1
    assert report["skipped_examples"] == [f"{path} line 4: {problem}"]
    assert data_lines(capsys) == [
        f"data: dataset_name {path}: 7 rows → 6 (1 bad row skipped (first: {path} line 4: {problem}))"
    ]


def test_blank_lines_are_counted(tmp_path, capsys):
    path = write_lines(tmp_path / "train.jsonl", [*SFT_LINES[:2], "", "   \t", *SFT_LINES[2:]])
    train, _, report = prepare(path)
    assert len(train) == 6
    assert report["cleaning"]["skipped_blank_lines"] == 2 and report["cleaning"]["skipped_bad_rows"] == 0
    assert data_lines(capsys) == [f"data: dataset_name {path}: 6 rows → 6 (2 blank lines ignored)"]


WRONG_SCHEMA = [
    ("sft", {"messages": "not a list"}, '`messages` is text "not a list", expected a list of {role, content} messages'),
    ("sft", {"messages": [{"content": "hi"}]}, "`messages[0]` has no `role`"),
    ("sft", {"messages": [{"role": "bot", "content": "hi"}]}, "`messages[0]` has role 'bot' (known: system, "),
    ("sft", {"messages": [{"role": "user", "content": 5}]}, "`messages[0]` `content` is a number (5), expected text"),
    ("sft", {"prompt": "question"}, "`completion` is missing"),
    ("sft", {"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "`prompt` holds text but"),
    ("preference", {"prompt": "q", "chosen": 5, "rejected": "r"}, "`chosen` is a number (5), expected text or a"),
    ("prompt_only", {"prompt": {"text": "q"}}, '`prompt` is a mapping ({"text": "q"}), expected text or a list'),
    ("language_modeling", {"text": ["a"]}, '`text` is a list (["a"]), expected text'),
]


@pytest.mark.parametrize(
    ("target", "bad_row", "problem"), WRONG_SCHEMA, ids=[f"{t}-{p[:18]}" for t, _, p in WRONG_SCHEMA]
)
def test_wrong_schema_row_is_named_then_skipped(tmp_path, capsys, target, bad_row, problem):
    """Each row type-checks against the columns its stage's format reads; the first bad one is named."""
    good = {
        "sft": [json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}) for i in range(6)],
        "preference": PAIR_LINES,
        "prompt_only": [json.dumps({"prompt": f"question {i}"}) for i in range(6)],
        "language_modeling": [json.dumps({"text": f"some text {i}"}) for i in range(6)],
    }[target]
    if target == "sft" and "prompt" in bad_row:
        good = SFT_LINES
    path = write_lines(tmp_path / "train.jsonl", [*good[:4], json.dumps(bad_row), *good[4:]])
    with pytest.raises(RecipeError) as error:
        prepare(path, target)
    message = str(error.value)
    assert message.startswith(f"dataset_name: {path} line 5: {problem}") and message.endswith(SKIP_HINT)

    train, _, report = prepare(path, target, skip_bad_rows=True)
    assert len(train) == 6 and report["cleaning"]["skipped_bad_rows"] == 1
    assert f"7 rows → 6 (1 bad row skipped (first: {path} line 5: {problem}" in data_lines(capsys)[0]


def test_json_array_rows_are_named_by_line(tmp_path):
    rows = [json.loads(line) for line in SFT_LINES]
    rows[2]["completion"] = None
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows, indent=2))  # each row spans 4 lines after the opening bracket
    with pytest.raises(RecipeError, match=f"^dataset_name: {path} line 10: `completion` is missing; fix the line"):
        prepare(path)
    train, _, _ = prepare(path, skip_bad_rows=True)
    assert len(train) == 5

    path.write_text(json.dumps(rows, indent=2).replace('"answer 4"', '"answer 4" "x"'))
    with pytest.raises(
        RecipeError,
        match=r"line 20: not valid JSON \(Expecting ',' delimiter\); fix the line \(rows of a JSON array cannot",
    ):
        prepare(path, skip_bad_rows=True)


def test_loaded_tables_name_the_row_index(tmp_path):
    """CSV, parquet and save_to_disk rows are checked after loading and named by row index."""
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(6)]
    rows[2]["completion"] = None
    Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(RecipeError, match="train.parquet row index 2: `completion` is missing; fix the row or set"):
        prepare(tmp_path / "train.parquet")
    assert len(prepare(tmp_path / "train.parquet", skip_bad_rows=True)[0]) == 5

    chats = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}] for i in range(4)]
    chats[1][1]["role"] = "bot"
    Dataset.from_list([{"messages": chat} for chat in chats]).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(RecipeError, match="disk row index 1: `messages\\[1\\]` has role 'bot'"):
        prepare(tmp_path / "disk")

    (tmp_path / "chats.csv").write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}]"\n')
    with pytest.raises(RecipeError, match="chats.csv row index 0: `messages` is text"):
        prepare(tmp_path / "chats.csv")

    (tmp_path / "latin1.csv").write_bytes(b"prompt,completion\nq1,a1\nq2,caf\xe9\n")
    with pytest.raises(RecipeError, match="latin1.csv line 3: not UTF-8 \\(byte 0xe9 at column 7"):
        prepare(tmp_path / "latin1.csv")


def test_mixture_and_eval_sources_are_named(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", SFT_LINES)
    bad = write_lines(tmp_path / "bad.jsonl", [SFT_LINES[0], "{oops", *SFT_LINES[1:]])
    mixture = DataArguments(dataset_mixture=[{"path": str(good)}, {"path": str(bad)}], test_split_size=0.0)
    with pytest.raises(RecipeError, match=f"^dataset_mixture\\[1\\]: {bad} line 2: not valid JSON"):
        prepare_datasets(mixture, "sft", 0)
    with_eval = DataArguments(dataset_name=str(good), eval_dataset_name=str(bad))
    with pytest.raises(RecipeError, match=f"^eval_dataset_name: {bad} line 2: not valid JSON"):
        prepare_datasets(with_eval, "sft", 0)


def test_invalid_pairs_are_dropped_and_counted(tmp_path, capsys):
    pairs = [
        {"prompt": "q a", "chosen": "the same  answer", "rejected": "the same answer"},  # same after normalising
        {"prompt": "q b", "chosen": "", "rejected": "an answer"},
        {"prompt": "q c", "chosen": "an answer", "rejected": " \t "},
    ]
    path = write_lines(tmp_path / "pairs.jsonl", [*PAIR_LINES, *map(json.dumps, pairs)])
    train, _, report = prepare(path, "preference")
    assert len(train) == 6
    assert report["cleaning"]["dropped_identical_pairs"] == 1
    assert report["cleaning"]["dropped_empty_side_pairs"] == 2
    assert data_lines(capsys) == [
        f"data: dataset_name {path}: 9 rows → 6 (1 pair with chosen == rejected dropped, 2 pairs with an empty side dropped)"
    ]


def test_invalid_implicit_prompt_pairs_are_dropped(tmp_path):
    """Conversations in chosen/rejected, prompt implicit: identical or one-sided pairs go too (trl failed on these)."""

    def chat(answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]

    pairs = [{"chosen": chat(f"hello {i}"), "rejected": chat(f"go away {i}")} for i in range(4)]
    pairs += [{"chosen": chat("same"), "rejected": chat("same")}, {"chosen": [], "rejected": chat("hello")}]
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(pair) for pair in pairs])
    train, _, report = prepare(path, "preference")
    assert len(train) == 4 and train[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert report["cleaning"]["dropped_identical_pairs"] == 1
    assert report["cleaning"]["dropped_empty_side_pairs"] == 1


def test_a_file_of_only_identical_pairs_stops_before_training(tmp_path):
    path = write_lines(
        tmp_path / "pairs.jsonl", [json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "a"}) for i in range(3)]
    )
    with pytest.raises(
        RecipeError, match=r"no rows left after cleaning \(3 rows → 0 \(3 pairs with chosen == rejected"
    ):
        prepare(path, "preference")


def test_explicit_eval_set_drops_invalid_pairs(tmp_path):
    train_path = write_lines(tmp_path / "train.jsonl", PAIR_LINES)
    same = json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"})
    eval_path = write_lines(tmp_path / "eval.jsonl", [*PAIR_LINES[:3], same])
    _, eval_, report = prepare_datasets(
        DataArguments(dataset_name=str(train_path), eval_dataset_name=str(eval_path)), "preference", 0
    )
    assert len(eval_) == 3 and report["eval_cleaning"]["dropped_identical_pairs"] == 1


def test_duplicates_are_said_once_on_the_console(tmp_path, capsys):
    path = write_lines(tmp_path / "train.jsonl", SFT_LINES * 20)
    for _ in range(2):  # pipeline pre-flight, then the stage: the same data, said once
        train, _, report = prepare(path)
    assert len(train) == 6 and report["cleaning"]["dropped_duplicates"] == 114
    assert data_lines(capsys) == [f"data: dataset_name {path}: 120 rows → 6 (114 duplicates removed)"]
