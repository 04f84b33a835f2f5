"""MkDocs hook: recipe-key tables generated from the code, and key names in the docs checked against it.

The keys, types and defaults come from the same place a user reads them: the output of
`rlhf train RECIPE.yaml --help` (rlhf.cli → the stage's parse → rlhf.recipe.recipe_keys_help), run
in-process once per stage on the stage's recipe under recipes/tiny/. The one-line descriptions come
from the same dataclasses' `metadata["help"]`. Two markers in a page:

    <!-- recipe-keys-table: STAGE -->
        replaced by the stage's key tables (every stage page must have one).

    <!-- recipe-keys: STAGE [STAGE ...] -->     (or `all`)
    | `key` | ... |
        a table right below it: every `code` name in its first column (outside parentheses, which
        hold values and notes) must be a recipe key of each stage named; a key the code no longer
        has fails the build.

The build also fails when a registered stage (rlhf.registry.STAGES) has no page under docs/stages/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import re
from pathlib import Path
from typing import Any

import yaml
from mkdocs.exceptions import PluginError

TABLE_MARKER = re.compile(r"^<!-- recipe-keys-table: (\w+) -->$", re.MULTILINE)
CHECK_MARKER = re.compile(r"^<!-- recipe-keys: ([\w ]+) -->$")
SECTION_LINE = re.compile(r"^  from (\S+?)(?::| \(|$)")
KEY_LINE = re.compile(r"^    (\w+): (.+?) = (.*?)(?:  \((.*)\))?$")
CODE_SPAN = re.compile(r"`([^`]+)`")

ROOT = Path(__file__).resolve().parent.parent
_keys_cache: dict[str, list[dict[str, Any]]] = {}


class Key:
    """One recipe key as `--help` lists it (a plain class: MkDocs loads this file outside sys.modules)."""

    def __init__(self, name: str, type_name: str, default: str, description: str) -> None:
        self.name, self.type, self.default, self.description = name, type_name, default, description


def _stages() -> dict[str, Any]:
    from rlhf.registry import STAGES

    return STAGES


def stage_recipe(stage: str) -> Path:
    """The tiny recipe a stage's page runs as its example: recipes/tiny/<stage>.yaml, else the first naming it."""
    candidates = sorted((ROOT / "recipes" / "tiny").glob("*.yaml"), key=lambda p: (p.stem != stage, p.name))
    for path in candidates:
        if (yaml.safe_load(path.read_text()) or {}).get("stage") == stage:
            return path
    raise PluginError(f"docs: stage {stage!r} has no recipe under recipes/tiny/ with `stage: {stage}`.")


def help_text(stage: str) -> str:
    """What `rlhf train recipes/tiny/<stage>.yaml --help` prints, run in this process."""
    from rlhf.cli import main

    recipe = stage_recipe(stage)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["train", str(recipe), "--help"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise PluginError(f"docs: `rlhf train {recipe} --help` exited with {stop.code}") from stop
    return out.getvalue()


def _dataclass(qualified: str) -> type | None:
    module, _, name = qualified.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if dataclasses.is_dataclass(cls) else None


def _first_sentence(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    match = re.search(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.\s+(?=[A-Z`(])", text)
    if match:
        text = text[: match.start() + 1]
    if len(text) > limit:
        text = text[: limit - 1].rsplit(" ", 1)[0] + " …"
    return text


def recipe_keys(stage: str) -> list[dict[str, Any]]:
    """The sections of a stage's `--help` output: [{"source": "module.Class", "keys": [Key, ...]}, ...]."""
    if stage in _keys_cache:
        return _keys_cache[stage]
    sections: list[dict[str, Any]] = []
    for line in help_text(stage).splitlines():
        if section := SECTION_LINE.match(line):
            sections.append({"source": section.group(1), "keys": []})
        elif (key := KEY_LINE.match(line)) and sections:
            name, type_name, default, note = key.groups()
            sections[-1]["keys"].append(Key(name, type_name, default, note or ""))
    if not any(section["keys"] for section in sections):
        raise PluginError(
            f"docs: found no recipe keys in `rlhf train {stage_recipe(stage)} --help`; its format changed, "
            "update KEY_LINE/SECTION_LINE in docs/hooks.py."
        )
    for section in sections:
        cls = _dataclass(section["source"])
        fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
        for key in section["keys"]:
            help_ = fields[key.name].metadata.get("help", "") if key.name in fields else ""
            key.description = key.description or _first_sentence(help_ or "")
    _keys_cache[stage] = sections
    return sections


def key_names(stage: str) -> set[str]:
    return {key.name for section in recipe_keys(stage) for key in section["keys"]}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else _cell(text)


def _table(keys: list[Key], indent: str = "") -> list[str]:
    lines = [f"{indent}| key | type | default | what it is |", f"{indent}|---|---|---|---|"]
    for key in keys:
        lines.append(f"{indent}| `{key.name}` | {_code(key.type)} | {_code(key.default)} | {_cell(key.description)} |")
    return lines


def keys_markdown(stage: str) -> str:
    """The Markdown tables of a stage's recipe keys, grouped by the dataclass each comes from."""
    from transformers import TrainingArguments

    shared = {f.name for f in dataclasses.fields(TrainingArguments)}
    recipe = stage_recipe(stage).relative_to(ROOT)
    out = [
        f"Generated when these docs are built, from `rlhf train {recipe} --help` (the same list, with "
        "its types and defaults) and the dataclasses' field help. Every key can also be given on the "
        "command line as `--key value`.",
        "",
    ]
    for section in recipe_keys(stage):
        source, keys = section["source"], section["keys"]
        kind = {"rlhf.config.ModelArguments": "Model", "rlhf.config.DataArguments": "Data"}.get(source)
        title = "The recipe itself" if source == "rlhf" else f"{kind or 'Training'}: `{source}`"
        training = kind is None and source != "rlhf"
        own = [key for key in keys if not (training and key.name in shared)]
        common = [key for key in keys if key not in own]
        out += [f"### {title}", ""]
        if own:
            out += [*_table(own), ""]
        if common:
            out += [
                f'??? note "{len(common)} more keys from `transformers.TrainingArguments` '
                '(batch size, learning rate, schedule, logging, saving, …)"',
                "",
                *_table(common, indent="    "),
                "",
            ]
    return "\n".join(out)


def check_key_tables(markdown: str, where: str) -> None:
    """Every `code` name in the first column of a `<!-- recipe-keys: ... -->` table is a key of those stages."""
    lines = markdown.splitlines()
    for number, line in enumerate(lines):
        marker = CHECK_MARKER.match(line.strip())
        if not marker:
            continue
        names = marker.group(1).split()
        stages = list(_stages()) if names == ["all"] else names
        unknown = [name for name in stages if name not in _stages()]
        if unknown:
            raise PluginError(f"docs: {where}:{number + 1}: recipe-keys marker names unknown stage(s) {unknown}")
        rows = []
        for row in lines[number + 1 :]:
            if not row.strip().startswith("|"):
                if rows:
                    break
                if row.strip():
                    raise PluginError(f"docs: {where}:{number + 1}: a recipe-keys marker must stand above a table")
                continue
            rows.append(row)
        checked = 0
        for row in rows[2:]:  # header and separator first
            first_cell = row.strip().strip("|").split("|")[0]
            while re.search(r"\([^()]*\)", first_cell):  # `code` in parentheses is a value or a note, not a key
                first_cell = re.sub(r"\([^()]*\)", "", first_cell)
            for span in CODE_SPAN.findall(first_cell):
                key = re.split(r"[:\s]", span.strip(), maxsplit=1)[0]
                checked += 1
                missing = [stage for stage in stages if key not in key_names(stage)]
                if missing:
                    raise PluginError(
                        f"docs: {where} names recipe key `{key}`, which stage(s) {', '.join(missing)} no longer "
                        f"have (per `rlhf train RECIPE --help`); fix the page or the code."
                    )
        if not checked:
            raise PluginError(f"docs: {where}:{number + 1}: the table under a recipe-keys marker names no `key`")


def on_files(files: Any, config: Any) -> Any:
    """Every registered stage has its page."""
    pages = {file.src_uri for file in files.documentation_pages()}
    missing = [name for name in _stages() if f"stages/{name}.md" not in pages]
    if missing:
        raise PluginError(f"docs: no page for stage(s) {', '.join(missing)}: add docs/stages/<name>.md")
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    where = page.file.src_uri
    check_key_tables(markdown, where)
    stage_page = re.fullmatch(r"stages/(\w+)\.md", where)
    if stage_page and stage_page.group(1) in _stages():
        stage = stage_page.group(1)
        if f"<!-- recipe-keys-table: {stage} -->" not in markdown:
            raise PluginError(f"docs: {where} needs a `<!-- recipe-keys-table: {stage} -->` line for its keys")
    for stage in TABLE_MARKER.findall(markdown):
        if stage not in _stages():
            raise PluginError(f"docs: {where}: recipe-keys-table names unknown stage {stage!r}")
    return TABLE_MARKER.sub(lambda match: keys_markdown(match.group(1)), markdown)
