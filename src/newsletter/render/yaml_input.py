"""Reading stage: a YAML file → plain data plus the line of every value.

Input: a path. Output: a :class:`YamlDocument` (the data as PyYAML builds it
with the safe loader, and a map from field paths such as
``("articles", 2, "url")`` to line numbers). Duplicate keys, which PyYAML
silently resolves by keeping the last, are reported as problems, as are YAML
syntax errors; nothing here knows what an issue is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from newsletter.errors import Problem

PathKey = tuple[str | int, ...]

_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """The safe loader (C version when available: several times faster, same marks),
    minus timestamps: dates stay text so that validation, not the YAML
    parser, reports an impossible date such as 2020-13-01 with its line."""

    yaml_implicit_resolvers: ClassVar[dict[Any, Any]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":timestamp")]
        for first, resolvers in _Base.yaml_implicit_resolvers.items()
    }


@dataclass(frozen=True, slots=True)
class Location:
    """Where a value sits: the line of its key (or list dash) and of the value itself."""

    key_line: int
    value_line: int
    style: str | None  # "|" or ">" for block scalars: the text starts on the next line


@dataclass(slots=True)
class YamlDocument:
    file: str
    data: Any
    locations: dict[PathKey, Location] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def line_of(self, path: PathKey, *, key: bool = False) -> int | None:
        """The line of the deepest known value on ``path`` (1-based)."""
        for n in range(len(path), -1, -1):
            loc = self.locations.get(path[:n])
            if loc is not None:
                return loc.key_line if (key and n == len(path)) else loc.value_line
        return None


def read_yaml(path: Path, *, shown_as: str | None = None) -> YamlDocument:
    """Parse ``path``; syntax errors become problems, never exceptions."""
    name = shown_as or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return YamlDocument(name, None, problems=[Problem(name, None, "", "file not found")])
    except UnicodeDecodeError as exc:
        msg = f"is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        return YamlDocument(name, None, problems=[Problem(name, None, "", msg)])
    except OSError as exc:
        return YamlDocument(
            name, None, problems=[Problem(name, None, "", exc.strerror or str(exc))]
        )
    doc = YamlDocument(name, None)
    alias = _first_alias(text)
    if alias is not None:
        # Editors have no need for anchors, and aliases allow files that
        # expand exponentially ("billion laughs") or refer to themselves.
        doc.problems.append(
            Problem(
                name,
                alias,
                "",
                "anchors and aliases (& and *) are not supported; write the value out in full",
            )
        )
        return doc
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            doc.problems.append(Problem(name, 1, "", "the file is empty"))
            return doc
        _index(node, (), doc, key_line=node.start_mark.line + 1)
        doc.data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(s for s in (exc.context, exc.problem) if s)
        hint = ""
        if "mapping values are not allowed" in what:
            hint = "; put text that contains ': ' in quotes"
        elif "found character '\\t'" in what:
            hint = "; indent with spaces, not tabs"
        doc.problems.append(Problem(name, line, "", f"YAML syntax error: {what}{hint}"))
        doc.data = None
    except yaml.YAMLError as exc:
        doc.problems.append(Problem(name, None, "", f"YAML error: {exc}"))
        doc.data = None
    except (TypeError, ValueError) as exc:  # e.g. a list used as a mapping key
        doc.problems.append(Problem(name, None, "", f"YAML could not be read: {exc}"))
        doc.data = None
    finally:
        loader.dispose()
    return doc


def _first_alias(text: str) -> int | None:
    """The line of the first anchor or alias, if any (syntax errors are left to the parser)."""
    try:
        for token in yaml.scan(text, Loader=_Loader):
            if isinstance(token, yaml.AliasToken | yaml.AnchorToken):
                return int(token.start_mark.line) + 1
    except yaml.YAMLError:
        return None
    return None


def _index(node: yaml.Node, path: PathKey, doc: YamlDocument, *, key_line: int) -> None:
    style = getattr(node, "style", None)
    doc.locations[path] = Location(key_line, node.start_mark.line + 1, style)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                doc.problems.append(
                    Problem(
                        doc.file,
                        line,
                        format_path((*path, key)),
                        f"appears twice (first on line {seen[key]}); keep only one",
                    )
                )
            seen[key] = line
            _index(value_node, (*path, key), doc, key_line=line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*path, i), doc, key_line=item.start_mark.line + 1)


def format_path(path: PathKey) -> str:
    """``("articles", 2, "url")`` → ``articles[2].url``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
