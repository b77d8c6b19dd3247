"""Reading spec YAML with line numbers, and collecting every problem before giving up.

A bad mapping spec must stop start-up with *all* of its problems listed, each with file and line, so
hospital IT fixes them in one pass instead of one restart per typo. The loader here keeps the line of
every key and list item; :class:`Problems` gathers messages against paths and turns them into
``file:line: message`` lines.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


class LineDict(dict[str, Any]):
    """A YAML mapping that remembers the line of itself and of each key (1-based)."""

    line: int
    key_lines: dict[str, int]


class LineList(list[Any]):
    """A YAML sequence that remembers the line of itself and of each item (1-based)."""

    line: int
    item_lines: list[int]


@dataclass(frozen=True)
class SpecProblem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class MappingSpecError(ValueError):
    """One or more mapping specs are invalid; ``problems`` lists every one with file and line."""

    def __init__(self, problems: Sequence[SpecProblem]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} in the mapping specs:\n  "
            + "\n  ".join(str(p) for p in self.problems)
        )


class _Loader(yaml.SafeLoader):
    """SafeLoader that builds LineDict/LineList and reports duplicate keys instead of keeping the last."""

    duplicate_keys: list[tuple[int, str]]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineDict:  # type: ignore[override]
        self.flatten_mapping(node)
        result = LineDict()
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            line = key_node.start_mark.line + 1
            if key in result:
                self.duplicate_keys.append((line, key))
                continue
            result[key] = self.construct_object(value_node, deep=True)
            result.key_lines[key] = line
        return result

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> LineList:
        result = LineList(self.construct_object(child, deep=True) for child in node.value)
        result.line = node.start_mark.line + 1
        result.item_lines = [child.start_mark.line + 1 for child in node.value]
        return result


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _Loader.construct_sequence)


def line_of(root: Any, path: Path_) -> int:
    """The line of the deepest element of ``path`` that exists in ``root`` (1 if nothing is known)."""
    line = getattr(root, "line", 1)
    node = root
    for step in path:
        if isinstance(node, LineDict) and isinstance(step, str) and step in node:
            line = node.key_lines.get(step, line)
            node = node[step]
        elif isinstance(node, LineList) and isinstance(step, int) and 0 <= step < len(node):
            line = node.item_lines[step]
            node = node[step]
        else:
            break
    return line


class Problems:
    """Collects problems of one file against paths into its YAML tree."""

    def __init__(self, file: str, root: Any = None) -> None:
        self.file = file
        self.root = root
        self.items: list[SpecProblem] = []
        # Codes of our own CodeSystem this file uses: checked against the whole catalogue's concepts.
        self.own_codes: list[tuple[Path_, str]] = []
        # Codes this file adds to our CodeSystem (kept even when the rest of the file is invalid).
        self.defined_codes: set[str] = set()

    def add(self, path: Path_, message: str) -> None:
        where = ".".join(str(p) for p in path)
        text = f"{where}: {message}" if where else message
        self.items.append(SpecProblem(self.file, line_of(self.root, path), text))

    def add_at(self, line: int, message: str) -> None:
        self.items.append(SpecProblem(self.file, line, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self) -> Iterator[SpecProblem]:
        return iter(self.items)


def load_yaml(path: Path, problems: Problems) -> Any:
    """Parse one YAML file; syntax errors and duplicate keys become problems (result ``None``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.add_at(1, f"cannot read the file: {exc}")
        return None
    loader = _Loader(text)
    loader.duplicate_keys = []
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problems.add_at(mark.line + 1 if mark else 1, f"not valid YAML: {exc.problem or exc}")
        return None
    except yaml.YAMLError as exc:
        problems.add_at(1, f"not valid YAML: {exc}")
        return None
    finally:
        loader.dispose()
    for line, key in loader.duplicate_keys:
        problems.add_at(line, f"{key}: key appears twice in the same mapping")
    problems.root = data
    return data
