"""OpenAI's grader templates: ``{{ item.reference_answer }}``, ``{{ sample.output_json.name }}``, ...

"Any string with ``{{ }}`` double curly braces will be substituted with the variable value. Each
input inside the ``{{}}`` must include a namespace and a variable ... The only supported namespaces
are ``item`` and ``sample``. All nested variables can be accessed with JSON path like syntax."
(OpenAI, graders guide). Paths are dotted names with ``[N]`` list indices
(``sample.output_tools[0].function.name``).

A string value is inserted as it is; any other JSON value as its compact JSON text (``1.0``,
``true``, ``["a", "b"]``), so both sides of a comparison render the same way.

What OpenAI documents only as error flags, alignd decides like this: a variable that does not
resolve (a missing item field, an index past the end) is an ``invalid_variable_error``, and
``sample.output_json`` when the sample is not valid JSON is a ``sample_parse_error``; either scores
the sample 0. Job creation checks every ``item`` variable against every line of the training file,
so in training the first case is caught before a GPU is spent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

NAMESPACES = ("item", "sample")
#: what the sample namespace holds (OpenAI's list); anything else under ``sample.`` is refused
SAMPLE_VARIABLES = ("output_text", "output_json", "output_tools", "choices", "output_audio")

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_SEGMENT = re.compile(r"\.?([^.\[\]\s{}]+)|\[(\d+)\]")


class TemplateSyntaxError(ValueError):
    """A ``{{ ... }}`` that is not ``namespace.path`` with a supported namespace (a 400 at validation)."""


class InvalidVariable(LookupError):
    """The path does not resolve in the item or sample (``invalid_variable_error``)."""


class SampleParseError(ValueError):
    """``sample.output_json`` was asked for but the sample is not valid JSON (``sample_parse_error``)."""


@dataclass(frozen=True)
class Variable:
    namespace: str
    path: tuple[str | int, ...]
    text: str

    def __str__(self) -> str:
        return self.text


def parse_variable(expr: str) -> Variable:
    text = expr.strip()
    segments: list[str | int] = []
    pos = 0
    while pos < len(text):
        match = _SEGMENT.match(text, pos)
        if match is None or match.end() == pos or (pos == 0 and match.group(0).startswith(".")):
            raise TemplateSyntaxError(f"'{{{{{expr}}}}}' is not a variable path such as item.answer or "
                                      "sample.output_json.items[0]")
        segments.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    if not segments or not isinstance(segments[0], str):
        raise TemplateSyntaxError(f"'{{{{{expr}}}}}' names no variable")
    namespace, path = segments[0], tuple(segments[1:])
    if namespace not in NAMESPACES:
        raise TemplateSyntaxError(f"'{{{{{expr}}}}}' uses namespace '{namespace}'; the only namespaces are "
                                  "item and sample")
    if namespace == "sample":
        if not path:
            raise TemplateSyntaxError(f"'{{{{{expr}}}}}' needs a sample variable: {', '.join(SAMPLE_VARIABLES)}")
        if path[0] not in SAMPLE_VARIABLES:
            raise TemplateSyntaxError(f"'{{{{{expr}}}}}': sample has no variable '{path[0]}' "
                                      f"(it has {', '.join(SAMPLE_VARIABLES)})")
    return Variable(namespace, path, text)


def variables(text: str) -> list[Variable]:
    """Every variable a template string uses, in order; raises :class:`TemplateSyntaxError`."""
    return [parse_variable(m.group(1)) for m in _TEMPLATE.finditer(text)]


def lookup(root: Any, path: tuple[str | int, ...], shown: str) -> Any:
    value = root
    for segment in path:
        if isinstance(segment, int):
            if not isinstance(value, list) or segment >= len(value):
                raise InvalidVariable(f"{shown}: no element [{segment}]")
            value = value[segment]
        else:
            if not isinstance(value, dict) or segment not in value:
                raise InvalidVariable(f"{shown}: no field '{segment}'")
            value = value[segment]
    return value


def resolve(variable: Variable, sample: dict[str, Any], item: Any) -> Any:
    if variable.namespace == "item":
        return lookup(item, variable.path, variable.text)
    if variable.path[0] == "output_json" and sample.get("output_json") is None:
        raise SampleParseError(f"{variable.text}: the sample is not a valid JSON object or array")
    return lookup(sample, variable.path, variable.text)


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(text: str, sample: dict[str, Any], item: Any) -> str:
    """Substitute every ``{{ namespace.path }}`` in ``text``."""
    return _TEMPLATE.sub(lambda m: as_text(resolve(parse_variable(m.group(1)), sample, item)), text)


def item_paths(texts: list[str]) -> list[Variable]:
    """The distinct ``item`` variables used by these template strings (for checking a dataset)."""
    seen: dict[tuple[str | int, ...], Variable] = {}
    for text in texts:
        for var in variables(text):
            if var.namespace == "item":
                seen.setdefault(var.path, var)
    return list(seen.values())
