"""FHIRPath for score expressions: a real syntax check at load, and compiled evaluation per record.

fhirpathpy's own parser recovers silently from syntax errors (``%scores.sum(`` "works"), which would
turn a typo in a spec into a wrong score in a chart. :func:`syntax_errors` runs the same ANTLR grammar
with a listener that reports every error, so a spec that does not parse stops start-up instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from antlr4 import CommonTokenStream, InputStream
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy import compile as _compile
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

Evaluator = Callable[[Any, dict[str, Any]], list[Any]]


class _Collect(ErrorListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.errors: list[str] = []

    def syntaxError(
        self, recognizer: Any, offendingSymbol: Any, line: int, column: int, msg: str, e: Any
    ) -> None:
        self.errors.append(f"column {column + 1}: {msg}")


def syntax_errors(expression: str) -> list[str]:
    """Every syntax error of a FHIRPath expression (empty when it parses completely)."""
    listener = _Collect()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    parser.entireExpression()  # type: ignore[no-untyped-call]
    return listener.errors


# `%name.sum()` and friends: the shape of nearly every score. Evaluated directly in Python (fhirpathpy
# walks its parse tree per call, ~100 us); the catalogue checks both give the same result at load.
_AGGREGATE = re.compile(r"^\s*%([A-Za-z_][A-Za-z0-9_]*)\s*\.\s*(sum|count|min|max)\s*\(\s*\)\s*$")
_AGGREGATES: dict[str, Callable[[list[Any]], list[Any]]] = {
    "sum": lambda values: [sum(values)],
    "count": lambda values: [len(values)],
    "min": lambda values: [min(values)] if values else [],
    "max": lambda values: [max(values)] if values else [],
}


def fast_path(expression: str) -> Evaluator | None:
    """A direct evaluator for ``%variable.sum()`` / ``count()`` / ``min()`` / ``max()``, else ``None``."""
    match = _AGGREGATE.match(expression)
    if match is None:
        return None
    name, function = match.groups()
    aggregate = _AGGREGATES[function]

    def evaluate(resource: Any, variables: dict[str, Any]) -> list[Any]:
        if name not in variables:
            raise ValueError(f"Attempting to access an undefined environment variable: {name}")
        return aggregate(variables[name])

    return evaluate


def reference_evaluator(expression: str) -> Evaluator:
    """fhirpathpy's evaluation of the expression (the reference the fast path is checked against)."""
    compiled = _compile(expression)

    def evaluate(resource: Any, variables: dict[str, Any]) -> list[Any]:
        result = compiled(resource, variables)
        return list(result) if isinstance(result, list) else [result]

    return evaluate


def compile_expression(expression: str) -> Evaluator:
    """Parse once; the result evaluates against a resource and environment variables (``%name``)."""
    return fast_path(expression) or reference_evaluator(expression)
