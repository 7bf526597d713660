"""``multi.calculate_output``: OpenAI's formula language, evaluated over a whitelisted AST, never ``eval``.

OpenAI's graders guide lists what a formula may use: the names of the multi grader's ``graders``,
the operators ``+ - * /`` and ``^`` (power), and the functions ``min max abs floor ceil exp sqrt
log``. alignd also accepts numbers, parentheses, unary ``+``/``-`` and comparisons
(``< <= > >= == !=``, 1.0 when true), which OpenAI's examples do not need but thresholds do.

``^`` is rewritten to ``**`` before parsing, so it binds like power in mathematics (``2 * x ^ 2`` is
``2 * (x ** 2)``, ``-x ^ 2`` is ``-(x ** 2)``); in Python's grammar ``^`` would be XOR with the
lowest precedence. Every value is a float (so ``9 ^ 9 ^ 9`` overflows at once instead of building a
huge integer), and the parsed tree is checked node by node against the whitelist: no attributes,
subscripts, keywords, lambdas or other names can reach evaluation.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

MAX_LENGTH = 4096
MAX_NODES = 1000

FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None]] = {
    # name: (function, fewest args, most args)
    "min": (min, 1, None),
    "max": (max, 1, None),
    "abs": (abs, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "exp": (math.exp, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 2),
}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_COMPARE: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}


class FormulaError(ValueError):
    """The formula cannot be parsed or names something it may not (``formula_parse_error``)."""


class FormulaRuntimeError(ArithmeticError):
    """Parsed, but this evaluation failed: division by zero, ``sqrt`` of a negative, overflow."""


class Formula:
    """A checked ``calculate_output``; :meth:`evaluate` maps sub-grader rewards to one reward."""

    def __init__(self, text: str, names: Iterable[str]) -> None:
        self.text = text
        self.names = frozenset(names)
        if len(text) > MAX_LENGTH:
            raise FormulaError(f"the formula is longer than {MAX_LENGTH} characters")
        if not text.strip():
            raise FormulaError("the formula is empty")
        try:
            tree = ast.parse(text.replace("^", "**").strip(), mode="eval")
        except SyntaxError as exc:
            raise FormulaError(f"cannot parse the formula: {exc.msg} at column {exc.offset}") from None
        except (RecursionError, MemoryError, ValueError):
            raise FormulaError("the formula is nested too deeply") from None
        nodes = list(ast.walk(tree))
        if len(nodes) > MAX_NODES:
            raise FormulaError(f"the formula has more than {MAX_NODES} parts")
        for node in nodes:
            self._check(node)
        called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
        for node in nodes:
            if isinstance(node, ast.Name) and id(node) not in called and node.id not in self.names:
                raise FormulaError(f"'{node.id}' is a function; call it, e.g. {node.id}(a, b)")
        self.tree = tree
        self.used = frozenset(n.id for n in nodes if isinstance(n, ast.Name) and n.id not in FUNCTIONS)

    def _check(self, node: ast.AST) -> None:
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Constant,
                   ast.Load, *_BINARY, *_UNARY, *_COMPARE)
        if not isinstance(node, allowed):
            raise FormulaError(f"'{_source(node)}' is not allowed in a formula (use sub-grader names, numbers, "
                               "+ - * / ^, comparisons and " + ", ".join(FUNCTIONS) + ")")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool)
                                               or not isinstance(node.value, int | float)):
            raise FormulaError(f"{node.value!r} is not a number")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise FormulaError(f"'{_source(node.func)}' is not a formula function "
                                   f"({', '.join(FUNCTIONS)})")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                raise FormulaError(f"{node.func.id}() takes plain arguments only")
            _, fewest, most = FUNCTIONS[node.func.id]
            if len(node.args) < fewest or (most is not None and len(node.args) > most):
                expected = str(fewest) if most == fewest else f"{fewest} or more" if most is None else \
                    f"{fewest} to {most}"
                raise FormulaError(f"{node.func.id}() takes {expected} argument(s), got {len(node.args)}")
        if isinstance(node, ast.Name) and node.id not in self.names and node.id not in FUNCTIONS:
            known = ", ".join(sorted(self.names)) or "none"
            raise FormulaError(f"'{node.id}' is not one of this multi grader's graders (graders: {known})")

    def evaluate(self, values: dict[str, float]) -> float:
        try:
            result = float(self._eval(self.tree.body, values))
        except FormulaError:
            raise
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise FormulaRuntimeError(f"{self.text}: {exc}") from None
        if not math.isfinite(result):
            raise FormulaRuntimeError(f"{self.text}: the result is not a finite number ({result})")
        return result

    def _eval(self, node: ast.expr, values: dict[str, float]) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id in values:
                return float(values[node.id])
            if node.id in FUNCTIONS:
                raise FormulaError(f"'{node.id}' is a function; call it, e.g. {node.id}(a, b)")
            raise FormulaError(f"no value for '{node.id}'")
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](self._eval(node.left, values), self._eval(node.right, values))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._eval(node.operand, values))
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, values)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self._eval(comparator, values)
                if not _COMPARE[type(op)](left, right):
                    return 0.0
                left = right
            return 1.0
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            function = FUNCTIONS[node.func.id][0]
            return float(function(*(self._eval(arg, values) for arg in node.args)))
        raise FormulaError(f"'{_source(node)}' is not allowed in a formula")


def _source(node: ast.AST) -> str:
    try:
        return ast.unparse(node)[:60]
    except Exception:  # noqa: BLE001 - only used for a message
        return type(node).__name__
