"""Convert the common dataset layouts into the columns TRL's trainers take.

Targets (what each stage needs):
- ``language_modeling``: ``text``
- ``sft``: ``messages``, or ``prompt`` + ``completion`` (plain or conversational), or ``text``
- ``preference``: ``prompt`` + ``chosen`` + ``rejected`` (explicit prompt)
- ``prompt_only``: ``prompt``
- ``unpaired`` (KTO): ``prompt`` + ``completion`` + ``label`` (true: a desirable answer); preference
  pairs become two rows each, the chosen answer labelled true and the rejected one false
Sources may be any of those, plus ShareGPT ``conversations``, Anthropic HH-style strings
("\\n\\nHuman: … \\n\\nAssistant: …"), and UltraFeedback-style implicit-prompt message lists.
"""

from __future__ import annotations

import re
from typing import Any

from datasets import Dataset, Value
from trl import maybe_convert_to_chatml, maybe_extract_prompt, unpair_preference_dataset

from rlhf.config import RecipeError

# Columns holding answers or whole conversations: a prompt-only dataset drops them.
ANSWER_COLUMNS = ("messages", "conversations", "chosen", "rejected", "completion", "text", "response", "label")
FORMATS = ("language_modeling", "sft", "preference", "prompt_only", "unpaired")
HH_TURN = re.compile(r"\n\nHuman:|\n\nAssistant:")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and "\n\nHuman:" in value and "\n\nAssistant:" in value


def hh_to_messages(text: str) -> list[dict[str, str]]:
    """Split an Anthropic HH-style transcript into chat messages."""
    messages = []
    for match, chunk in zip(HH_TURN.findall(text), HH_TURN.split(text)[1:]):
        role = "user" if "Human" in match else "assistant"
        messages.append({"role": role, "content": chunk.strip()})
    return messages


def _messages_to_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def _extract_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """trl's `maybe_extract_prompt`, except that a pair with an empty side passes through for cleaning to drop."""
    if not (row["chosen"] and row["rejected"]):
        return {"prompt": row.get("prompt", row["chosen"][:0]), "chosen": row["chosen"], "rejected": row["rejected"]}
    return maybe_extract_prompt(row)


def _missing(columns: list[str], target: str, field: str) -> RecipeError:
    needs = {
        "language_modeling": "`text` (or `prompt`+`completion`, or `messages`)",
        "sft": "`messages`, `prompt`+`completion`, `text`, or ShareGPT `conversations`",
        "preference": "`chosen`+`rejected` (and `prompt`, or an implicit prompt inside them)",
        "prompt_only": "`prompt` (or `messages`)",
        "unpaired": "`prompt`+`completion`+`label`, or preference pairs `chosen`+`rejected` (and `prompt`)",
    }[target]
    return RecipeError(
        f"{field}: columns {columns} do not fit this stage, which needs {needs}; "
        "rename them with `dataset_rename_columns: {old: new}` (or `rename_columns` in a mixture entry)."
    )


def _unpaired(dataset: Dataset, field: str) -> Dataset:
    """KTO's layout: labelled rows as they are, or each preference pair split into a desirable and an undesirable row."""
    columns = dataset.column_names
    if {"prompt", "completion", "label"} <= set(columns):
        dataset = dataset.select_columns(["prompt", "completion", "label"])
        if dataset.features["label"].dtype == "bool":
            return dataset
        wrong = next((value for value in dataset["label"] if value not in (0, 1)), None)
        if wrong is not None:
            raise RecipeError(
                f"{field}: column `label` holds {wrong!r}; KTO needs true (a desirable completion) or false."
            )
        return dataset.cast_column("label", Value("bool"))  # 0/1 labels, as some datasets store them
    if not {"chosen", "rejected"} <= set(columns):
        raise _missing(columns, "unpaired", field)
    pairs = convert(dataset, "preference", field)
    # A pair with an empty or identical side would become an empty completion or two rows that contradict
    # each other; the preference cleaning drops such pairs, so drop them here before they are split.
    pairs = pairs.filter(lambda r: bool(r["chosen"]) and bool(r["rejected"]) and r["chosen"] != r["rejected"])
    return unpair_preference_dataset(pairs)


def convert(dataset: Dataset, target: str, field: str = "dataset_name") -> Dataset:
    """Return `dataset` in the layout `target` needs, or raise a RecipeError naming the missing columns."""
    columns = dataset.column_names
    if "conversations" in columns and "messages" not in columns:
        dataset = dataset.map(maybe_convert_to_chatml)
        dataset = dataset.map(
            lambda r: {"messages": [{**m, "role": SHAREGPT_ROLES.get(m["role"], m["role"])} for m in r["messages"]]}
        )
        columns = dataset.column_names
    if target == "language_modeling":
        if "text" in columns:
            return dataset.select_columns(["text"])
        if {"prompt", "completion"} <= set(columns) and isinstance(dataset[0]["prompt"], str):
            return dataset.map(lambda r: {"text": r["prompt"] + r["completion"]}, remove_columns=columns)
        if "messages" in columns:
            return dataset.map(lambda r: {"text": _messages_to_text(r["messages"])}, remove_columns=columns)
        raise _missing(columns, target, field)
    if target == "sft":
        if "messages" in columns:
            return dataset.select_columns(["messages"])
        if {"prompt", "completion"} <= set(columns):
            return dataset.select_columns(["prompt", "completion"])
        if "text" in columns:
            if _is_hh(dataset[0]["text"]):
                return dataset.map(lambda r: {"messages": hh_to_messages(r["text"])}, remove_columns=columns)
            return dataset.select_columns(["text"])
        raise _missing(columns, target, field)
    if target == "preference":
        if not {"chosen", "rejected"} <= set(columns):
            raise _missing(columns, target, field)
        # The first pair with a chosen side shows the layout (an empty one is dropped in cleaning).
        first = next((row for row in dataset if row["chosen"]), dataset[0])
        if _is_hh(first["chosen"]):
            dataset = dataset.map(
                lambda r: {"chosen": hh_to_messages(r["chosen"]), "rejected": hh_to_messages(r["rejected"])},
            )
        elif "prompt" in columns and isinstance(first["chosen"], list) and first["chosen"][0]["role"] != "assistant":
            # UltraFeedback: the prompt string is repeated inside chosen/rejected; the lists win.
            dataset = dataset.remove_columns("prompt")
        keep = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
        dataset = dataset.select_columns(keep).map(_extract_prompt)
        if isinstance(dataset[0]["prompt"], str) and "prompt" not in keep and not any(dataset["prompt"]):
            raise RecipeError(f"{field}: chosen and rejected share no prompt; add a `prompt` column.")
        return dataset
    if target == "prompt_only":
        if "prompt" in columns:
            # Other columns stay: TRL hands them to reward functions (a `kind`, IFEval's instruction ids...).
            extra = [c for c in columns if c not in ANSWER_COLUMNS and c != "prompt"]
            return dataset.select_columns(["prompt", *extra])
        if "messages" in columns:

            def last_user_turn(row: dict) -> dict:
                turns = row["messages"]
                while turns and turns[-1]["role"] == "assistant":
                    turns = turns[:-1]
                return {"prompt": turns}

            return dataset.map(last_user_turn, remove_columns=columns)
        if {"chosen", "rejected"} <= set(columns):
            return convert(dataset, "preference", field).select_columns(["prompt"])
        raise _missing(columns, target, field)
    if target == "unpaired":
        return _unpaired(dataset, field)
    raise ValueError(f"unknown target format {target!r}; use one of {FORMATS}")
