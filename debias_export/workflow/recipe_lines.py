"""Where in a recipe's YAML a problem sits: key path -> line, read from yaml's node marks (nothing is constructed).

Kept apart from the schema (``recipe``) so the loader's error path and the schema change independently.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import ConfigError


def check_duplicate_keys(node: Any, path: str, file: Path) -> None:
    """Refuse a mapping that repeats a key (YAML's last value would win silently), naming key path and line."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            where = f"{path}.{key}" if path else str(key)
            if key is not None and key != "<<":  # "<<" merge keys may repeat
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{file} line {line}: duplicate key {where!r} (first at line {seen[key]})")
                seen[key] = line
            check_duplicate_keys(value_node, where, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            check_duplicate_keys(item, f"{path}[{i}]", file)


def key_lines(node: Any, path: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Key path (``edit.alpha``, ``variants[1].edit.alpha``, ``bench.batch_sizes[0]``) -> 1-based line, from the
    composed node tree (yaml's marks; nothing is constructed)."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            where = f"{path}.{key}" if path else str(key)
            out.setdefault(where, key_node.start_mark.line + 1)
            key_lines(value_node, where, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(f"{path}[{i}]", item.start_mark.line + 1)
            key_lines(item, f"{path}[{i}]", out)
    return out


_VARIANT = re.compile(r"^variants\[(\d+)\](?: \([^)]*\))?: ")
_KEYED = re.compile(r"^(?:unknown key|missing key|duplicate key) '([^']+)'|^([A-Za-z_][\w.\[\]]*): ")


def line_of(message: str, lines: dict[str, int]) -> int | None:
    """The line of the key a validation message names (``edit.alpha: must be ...``, ``unknown key 'x.y'``); a
    missing key points at its parent mapping, a key a variant inherits at the base recipe's line."""
    prefixes = [""]
    if m := _VARIANT.match(message):
        prefixes = [f"variants[{m.group(1)}].", ""]
        message = message[m.end():]
    m = _KEYED.match(message)
    if not m:
        return None
    key = m.group(1) or m.group(2)
    candidates = [key]
    if message.startswith("missing key") or message.startswith("unknown key"):
        candidates.append(key.rpartition(".")[0])  # the mapping that lacks (or holds) it
    for prefix in prefixes:
        for k in candidates:
            if k and (line := lines.get(prefix + k)) is not None:
                return line
    return lines.get(prefixes[0].rstrip(".")) if prefixes[0] else None  # a variant's own problem: its first line


def yaml_error_message(path: Path, exc: yaml.YAMLError) -> str:
    """``FILE line N: not valid YAML (problem)`` for a syntax error (its problem mark, else its context mark)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: not valid YAML ({problem})"
