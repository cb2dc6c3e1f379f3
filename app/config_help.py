"""Every config key with its type, default and meaning, for `--help`: read from the dataclasses
of `app.config` and the comments beside their fields, so the help cannot drift from the code."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing

from app import config

PER_NAME = {"tasks": "<task>", "tables": "<column>"}  # dict fields: one entry per name


def _comments() -> dict[int, str]:
    """Line number -> comment text of app/config.py."""
    source = inspect.getsource(config)
    return {tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}


def _field_help(cls: type, comments: dict[int, str]) -> dict[str, str]:
    """Field -> the comment lines right above it and the one at its end, joined."""
    lines, start = inspect.getsourcelines(cls)
    tree = ast.parse(inspect.cleandoc("".join(lines)) if lines[0].startswith(" ") else "".join(lines))
    out = {}
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign):
            line = start + node.lineno - 1
            above, k = [], line - 1
            while k in comments and not _is_code(k, start, lines):
                above.insert(0, comments[k])
                k -= 1
            out[node.target.id] = " ".join([*above, comments.get(line, "")]).strip()
    return out


def _is_code(line: int, start: int, lines: list[str]) -> bool:
    text = lines[line - start] if 0 <= line - start < len(lines) else ""
    return not text.strip().startswith("#")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def keys(cls: type = config.Config, prefix: str = "", comments: dict[int, str] | None = None) -> list[tuple]:
    """(dotted key, type, default, meaning) of every field under `cls`, sections expanded."""
    comments = _comments() if comments is None else comments
    helps, hints = _field_help(cls, comments), typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += keys(tp, f"{key}.", comments)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            out += keys(typing.get_args(tp)[1], f"{key}.{PER_NAME[f.name]}.", comments)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((key, _type_name(tp), json.dumps(default), helps[f.name]))
    return out


def help_text() -> str:
    rows = keys()
    lines = ["config keys (precedence: command line > --config file > these defaults; override any with",
             "--section.key VALUE, VALUE written as in TOML: 3, 0.5, true, \"x\", [1, 2]):"]
    for key, tp, default, meaning in rows:
        lines.append(f"  {key}: {tp} = {default}")
        lines += textwrap.wrap(meaning, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
