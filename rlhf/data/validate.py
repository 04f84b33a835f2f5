"""Find bad rows before any model loads: unreadable JSON lines, and values that do not fit the stage's format.

Every problem comes with where it is (`line 17` of a JSON file, `row index 16` of a loaded table),
so the caller can name it in one RecipeError line, or skip the row and count it.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Value

from rlhf.data.formats import SHAREGPT_ROLES

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT, MESSAGES, TEXT_OR_MESSAGES, SHAREGPT = "text", "messages", "text or messages", "sharegpt"
# Columns TRL reads as one example: both hold text, or both hold message lists.
PAIRED = (("prompt", "completion"), ("chosen", "rejected"))
WHITESPACE_BYTES = b" \t\r\n"


@dataclass
class JsonScan:
    """What a line-by-line read of a JSON/JSON Lines file found."""

    row_lines: list[int] = field(default_factory=list)  # the line of each row `datasets` will read, in order
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, problem) of rows it cannot read
    blank_lines: int = 0
    kept: list[bytes] | None = None  # a JSON array's good rows as JSON Lines, when some are bad
    fatal: bool = False  # a broken JSON array cannot be read past its first error, skipping or not


def _parse(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg})"


def _not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    column = error.start - data.rfind(b"\n", 0, error.start)  # counted in bytes, from 1
    return f"not UTF-8 (byte 0x{data[error.start]:02x} at column {column}; re-save the file as UTF-8)"


def _show(value: Any) -> str:
    """A value as a short phrase for a message: `text "abc"`, `a number (5)`, `null`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    snippet = json.dumps(value, ensure_ascii=False, default=str)
    snippet = snippet if len(snippet) <= 40 else snippet[:37] + "..."
    kind = {str: "text", dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)
    return f"{kind} {snippet}" if isinstance(value, str) else f"{kind} ({snippet})"


def scan_json_file(path: str | Path, stop_at_first: bool) -> JsonScan:
    """Read a JSON Lines file (or a JSON array, as `datasets` does when the file starts with `[`) line by line."""
    scan = JsonScan()
    with open(path, "rb") as handle:
        start = len(codecs.BOM_UTF8) if handle.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        handle.seek(start)  # `datasets` skips a leading BOM too
        if handle.read(1) == b"[":
            handle.seek(start)
            return _scan_json_array(handle.read(), scan)
        handle.seek(start)
        for number, raw in enumerate(handle, 1):
            if not raw.strip(WHITESPACE_BYTES):  # the Arrow JSON reader skips these lines too
                scan.blank_lines += 1
                continue
            try:
                value, problem = _parse(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                problem = _not_utf8(raw, error)
            else:
                if problem is None and not isinstance(value, dict):
                    problem = f"expected one JSON object ({{...}}) per line, got {_show(value)}"
            if problem is None:
                scan.row_lines.append(number)
                continue
            scan.bad.append((number, problem))
            if stop_at_first:
                break
    return scan


def write_good_rows(path: str | Path, scan: JsonScan, out: BinaryIO) -> None:
    """Write the rows `scan` could read as JSON Lines, for `datasets` to load without the bad ones."""
    if scan.kept is not None:
        out.writelines(scan.kept)
        return
    bad = {line for line, _ in scan.bad}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if number not in bad and raw.strip(WHITESPACE_BYTES):
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _scan_json_array(data: bytes, scan: JsonScan) -> JsonScan:
    """Walk a JSON array item by item, so each row's line is known; a syntax error ends the walk."""
    scan.fatal = True  # until the walk reaches the closing bracket
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        scan.bad.append((data.count(b"\n", 0, error.start) + 1, _not_utf8(data, error)))
        return scan
    decoder = json.JSONDecoder()
    items: list[tuple[int, Any]] = []
    at = _skip_space(text, 1)
    closed = at < len(text) and text[at] == "]"
    line, counted_to = 1, 0  # newlines are counted once, as the walk moves on
    while not closed:
        line, counted_to = line + text.count("\n", counted_to, at), at
        try:
            item, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            scan.bad.append((error.lineno, f"not valid JSON ({error.msg})"))
            return scan
        items.append((line, item))
        at = _skip_space(text, at)
        if at < len(text) and text[at] == ",":
            at = _skip_space(text, at + 1)
        elif at < len(text) and text[at] == "]":
            closed = True
        else:
            scan.bad.append((text.count("\n", 0, at) + 1, "not valid JSON (Expecting ',' delimiter)"))
            return scan
    at = _skip_space(text, at + 1)
    if at < len(text):
        scan.bad.append((text.count("\n", 0, at) + 1, "not valid JSON (Extra data after the array)"))
        return scan
    scan.fatal = False
    # `datasets` reads an array of strings as a `text` column, and an array of objects as rows.
    kind = str if items and isinstance(items[0][1], str) else dict
    for line, item in items:
        if isinstance(item, kind):
            scan.row_lines.append(line)
        else:
            wanted = "text" if kind is str else "a JSON object ({...})"
            scan.bad.append((line, f"expected {wanted} like the first item, got {_show(item)}"))
    if scan.bad:
        rows = [item if kind is dict else {"text": item} for _, item in items if isinstance(item, kind)]
        scan.kept = [json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows]
    return scan


def checked_columns(columns: list[str], target: str) -> dict[str, str]:
    """The columns `formats.convert` reads for `target`, each with the kind of value it needs."""
    present = set(columns)
    sharegpt = "conversations" in present and "messages" not in present
    # ShareGPT `conversations` become `messages`: check them as they are in the file.
    messages = {"conversations": SHAREGPT} if sharegpt else {"messages": MESSAGES}
    has_messages = sharegpt or "messages" in present
    has_pair = {"prompt", "completion"} <= present
    pair = {"prompt": TEXT_OR_MESSAGES, "completion": TEXT_OR_MESSAGES}
    preference = {"chosen": TEXT_OR_MESSAGES, "rejected": TEXT_OR_MESSAGES}
    if "prompt" in present:
        preference["prompt"] = TEXT_OR_MESSAGES
    has_preference = {"chosen", "rejected"} <= present
    if target == "language_modeling":
        if "text" in present:
            return {"text": TEXT}
        return pair if has_pair else messages if has_messages else {}
    if target == "sft":
        if has_messages:
            return messages
        return pair if has_pair else {"text": TEXT} if "text" in present else {}
    if target == "preference":
        return preference if has_preference else {}
    if target == "unpaired":  # KTO: labelled prompt/completion rows, or preference pairs it splits
        return preference if has_preference else pair if has_pair else {}
    if target == "prompt_only":
        if "prompt" in present:
            return {"prompt": TEXT_OR_MESSAGES}
        return messages if has_messages else preference if has_preference else {}
    return {}  # nothing fits: `convert` names the missing columns


def _message_list_problem(value: list, column: str, sharegpt: bool) -> str | None:
    roles = tuple(dict.fromkeys((*KNOWN_ROLES, *SHAREGPT_ROLES))) if sharegpt else KNOWN_ROLES
    for i, message in enumerate(value):
        where = f"`{column}[{i}]`"
        if not isinstance(message, dict):
            return f"{where} is {_show(message)}, expected a {{role, content}} message"
        role = message.get("role", message.get("from")) if sharegpt else message.get("role")
        content = message.get("content", message.get("value")) if sharegpt else message.get("content")
        if role is None:
            return f"{where} has no `role`"
        if role not in roles:
            shown = repr(role) if isinstance(role, str) else _show(role)
            return f"{where} has role {shown} (known: {', '.join(roles)})"
        if not isinstance(content, str):
            return f"{where} `content` is {_show(content)}, expected text"
    return None


def value_problem(value: Any, kind: str, column: str) -> str | None:
    """Why `value` does not fit a column of this kind, or None when it does."""
    if value is None:
        return f"`{column}` is missing"
    if isinstance(value, str) and kind in (TEXT, TEXT_OR_MESSAGES):
        return None
    expected = {
        TEXT: "text",
        MESSAGES: "a list of {role, content} messages",
        TEXT_OR_MESSAGES: "text or a list of {role, content} messages",
        SHAREGPT: "a list of {from, value} messages",
    }[kind]
    if kind == TEXT or not isinstance(value, list):
        return f"`{column}` is {_show(value)}, expected {expected}"
    return _message_list_problem(value, column, kind == SHAREGPT)


def _holds(value: Any) -> str:
    return "text" if isinstance(value, str) else "message lists"


def _row_problem(row: dict[str, Any], checks: dict[str, str], first_kinds: dict[str, str]) -> str | None:
    for column, kind in checks.items():
        problem = value_problem(row[column], kind, column)
        if problem:
            return problem
    for first, second in PAIRED:
        if first in checks and second in checks and _holds(row[first]) != _holds(row[second]):
            return f"`{first}` holds {_holds(row[first])} but `{second}` holds {_holds(row[second])}"
    for column, kind in checks.items():
        if kind == TEXT_OR_MESSAGES:
            seen = first_kinds.setdefault(column, _holds(row[column]))
            if seen != _holds(row[column]):
                return f"`{column}` holds {_holds(row[column])} but earlier rows hold {seen}"
    return None


def _column_is_clean(dataset: Dataset, column: str, kind: str) -> bool:
    """Whether Arrow's types and null counts alone show every value fits (no row needs to be read)."""
    feature, values = dataset.features[column], dataset.data.column(column)
    if values.null_count:
        return False
    if kind in (TEXT, TEXT_OR_MESSAGES) and isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return True
    if kind not in (MESSAGES, TEXT_OR_MESSAGES) or not pa.types.is_list(values.type):
        return False
    item = values.type.value_type
    if not pa.types.is_struct(item) or item.get_field_index("role") < 0 or item.get_field_index("content") < 0:
        return False
    if not all(pa.types.is_string(item.field(name).type) for name in ("role", "content")):
        return False
    messages = pc.list_flatten(values)
    roles, contents = pc.struct_field(messages, "role"), pc.struct_field(messages, "content")
    if messages.null_count or roles.null_count or contents.null_count:
        return False
    return len(roles) == 0 or pc.all(pc.is_in(roles, value_set=pa.array(KNOWN_ROLES))).as_py()


def find_bad_rows(dataset: Dataset, target: str | None) -> Iterator[tuple[int, str]]:
    """Yield (row index, problem) for each row whose values do not fit what `target` needs."""
    if target is None or len(dataset) == 0:
        return
    checks = checked_columns(dataset.column_names, target)
    if not checks:
        return
    # Clean columns of one Arrow type need no row read; only a messy file pays for the loop below.
    if dataset._indices is None and all(_column_is_clean(dataset, c, k) for c, k in checks.items()):
        types = {c: dataset.features[c].__class__ for c in checks}
        if all(types[a] == types[b] for a, b in PAIRED if a in types and b in types):
            return
    first_kinds: dict[str, str] = {}
    index = 0
    for batch in dataset.select_columns(list(checks)).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in checks)):
            problem = _row_problem(dict(zip(checks, values)), checks, first_kinds)
            if problem:
                yield index, problem
            index += 1


def first_undecodable_line(path: str | Path) -> tuple[int, str] | None:
    """(line, problem) of the first line that is not UTF-8, or None; for files read whole, such as CSV."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, _not_utf8(raw, error)
    return None
