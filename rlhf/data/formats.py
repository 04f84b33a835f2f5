"""Convert the common dataset layouts into the columns TRL's trainers take.

Targets (what each stage needs):
- ``language_modeling``: ``text``
- ``sft``: ``messages``, or ``prompt`` + ``completion`` (plain or conversational), or ``text``
- ``preference``: ``prompt`` + ``chosen`` + ``rejected`` (explicit prompt)
- ``prompt_only``: ``prompt``
Sources may be any of those, plus ShareGPT ``conversations``, Anthropic HH-style strings
("\\n\\nHuman: … \\n\\nAssistant: …"), and UltraFeedback-style implicit-prompt message lists.
"""

from __future__ import annotations

import re
from typing import Any

from datasets import Dataset
from trl import maybe_convert_to_chatml, maybe_extract_prompt

from rlhf.config import RecipeError

FORMATS = ("language_modeling", "sft", "preference", "prompt_only")
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
    }[target]
    return RecipeError(
        f"{field}: columns {columns} do not fit this stage, which needs {needs}; "
        "rename them with `dataset_rename_columns: {old: new}` (or `rename_columns` in a mixture entry)."
    )


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
            extra = [c for c in ("kind",) if c in columns]
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
    raise ValueError(f"unknown target format {target!r}; use one of {FORMATS}")
