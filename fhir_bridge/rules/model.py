"""Rule files and their evaluation over a patient's measurement history: pure, no database.

A rule file is YAML with a versioned envelope::

    apiVersion: fhir-bridge/rules/v1
    rules:
      - id: no-response                      # [a-z0-9-], unique; a tenant file with the same id replaces it
        title: PHQ-9 not responding after 8 weeks
        trigger: data                        # data (default): when records arrive; schedule: also by worker
        params: {weeks: 8, response_pct: -50}  # numbers, usable by name below
        let:                                 # named values (expressions), usable in `when` and `reason`
          now: latest("phq9.total")
          change: change_pct("phq9.total")
        when: weeks_since_baseline("phq9.total") >= weeks and change > response_pct
        reason: "PHQ-9 {now} on {now.date} is {change:+.0f} % from baseline"
        priority: routine                    # routine | urgent | asap | stat (the alert's and Task's)
        flag: {category: [safety, behavioral], text: "..."}   # optional: a Flag in the EHR
        task: {text: "Schedule follow-up visit"}               # optional: a Task in the EHR

Expressions are a small, safe subset of Python syntax (parsed with :mod:`ast`, never ``eval``ed):
numbers, names (``params``/``let``), ``+ - * /``, comparisons, ``and``/``or``/``not``, and calls of
the aggregate functions in :data:`FUNCTIONS`. A missing value (no data) is ``None``: arithmetic with
it is ``None`` and every comparison with it is false, so a rule never fires on absent data unless it
asks about absence (``days_since_last``).

Evaluation is *as of* a moment: only measurements at or before it count. When data arrives, each
rule is evaluated as of each new measurement it reads, in time order, so a history gives the same
firings whether it arrives in one batch or one record at a time.
"""

from __future__ import annotations

import ast
import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from mappings.fhirpath import compile_expression, syntax_errors

API_VERSION = "fhir-bridge/rules/v1"
DEFAULTS_DIR = Path(__file__).parent / "defaults"
ANY = "*"
RULE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,99}\Z")
PRIORITIES = ("routine", "urgent", "asap", "stat")
FLAG_CATEGORIES = (
    "diet",
    "drug",
    "lab",
    "admin",
    "contact",
    "clinical",
    "behavioral",
    "research",
    "advance-directive",
    "safety",
)
_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)(\.date)?(?::([^{}]*))?\}")
_FORMAT_SPEC = re.compile(r"[+\- ]?\d{0,2}(?:\.\d{1,2})?[fg%]?\Z")


class RuleFileError(ValueError):
    """A rule file is invalid; every problem names the file and the field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid rule file(s):\n  " + "\n  ".join(problems))
        self.problems = problems


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Val:
    """A number with the moment it was measured (and that moment's UTC offset), for reasons."""

    value: float
    at: datetime | None = None
    offset_min: int = 0

    def local_date(self) -> str:
        if self.at is None:
            return "?"
        return self.at.astimezone(timezone(timedelta(minutes=self.offset_min))).date().isoformat()


Value = Val | float | None


def num(value: Value) -> float | None:
    if value is None:
        return None
    return value.value if isinstance(value, Val) else float(value)


# -- history ------------------------------------------------------------------------------------


@dataclass
class Series:
    times: list[datetime] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)


class History:
    """One patient's measurements by code, sorted by time; ``*`` is every code together."""

    def __init__(
        self, rows: Iterable[tuple[str, datetime, float, int]], *, since: datetime | None = None
    ) -> None:
        by_code: dict[str, list[tuple[datetime, float, int, str]]] = {}
        for code, at, value, offset in rows:
            by_code.setdefault(code, []).append((at, value, offset, code))
            by_code.setdefault(ANY, []).append((at, value, offset, code))
        self.series: dict[str, Series] = {}
        for code, points in by_code.items():
            points.sort(key=lambda p: p[0])
            self.series[code] = Series(
                [p[0] for p in points], [p[1] for p in points], [p[2] for p in points], [p[3] for p in points]
            )
        # When observation started (the enrollment's claim): absence is counted from here without data.
        self.since = since

    def get(self, code: str) -> Series:
        return self.series.get(code) or Series()


@dataclass(frozen=True)
class AsOf:
    history: History
    at: datetime

    def upto(self, code: str) -> tuple[Series, int]:
        series = self.history.get(code)
        return series, bisect_right(series.times, self.at)

    def point(self, series: Series, index: int) -> Val:
        return Val(series.values[index], series.times[index], series.offsets[index])


def _latest(ctx: AsOf, code: str) -> Value:
    series, n = ctx.upto(code)
    return ctx.point(series, n - 1) if n else None


def _baseline(ctx: AsOf, code: str) -> Value:
    series, n = ctx.upto(code)
    return ctx.point(series, 0) if n else None


def _change(ctx: AsOf, code: str) -> Value:
    series, n = ctx.upto(code)
    if n < 2:
        return None
    return Val(series.values[n - 1] - series.values[0], series.times[n - 1], series.offsets[n - 1])


def _change_pct(ctx: AsOf, code: str) -> Value:
    series, n = ctx.upto(code)
    if n < 2 or series.values[0] == 0:
        return None
    pct = 100.0 * (series.values[n - 1] - series.values[0]) / abs(series.values[0])
    return Val(pct, series.times[n - 1], series.offsets[n - 1])


def _days_since_baseline(ctx: AsOf, code: str) -> Value:
    series, n = ctx.upto(code)
    if n < 2:
        return None
    return (series.times[n - 1] - series.times[0]).total_seconds() / 86400


def _weeks_since_baseline(ctx: AsOf, code: str) -> Value:
    days = _days_since_baseline(ctx, code)
    return None if days is None else float(math.floor(num(days) or 0.0) // 7)


def _days_since_last(ctx: AsOf, code: str = ANY) -> Value:
    series, n = ctx.upto(code)
    start = series.times[n - 1] if n else ctx.history.since
    if start is None:
        return None
    return max(0.0, (ctx.at - start).total_seconds() / 86400)


def _window(ctx: AsOf, code: str, days: float) -> tuple[Series, int, int]:
    series, n = ctx.upto(code)
    first = bisect_left(series.times, ctx.at - timedelta(days=float(days)))  # inclusive: [at - days, at]
    return series, first, n


def _count(ctx: AsOf, code: str, days: float) -> Value:
    _, first, n = _window(ctx, code, days)
    return float(n - first)


def _extreme(highest: bool) -> Callable[[AsOf, str, float], Value]:
    def aggregate(ctx: AsOf, code: str, days: float) -> Value:
        series, first, n = _window(ctx, code, days)
        if first >= n:
            return None
        best = first
        for i in range(first + 1, n):
            if (
                (series.values[i] > series.values[best])
                if highest
                else (series.values[i] < series.values[best])
            ):
                best = i
        return ctx.point(series, best)

    return aggregate


@lru_cache(maxsize=256)
def _fhirpath_evaluator(expression: str) -> Any:
    return compile_expression(expression)


def json_view(ctx: AsOf) -> dict[str, Any]:
    """What ``fhirpath()`` sees: the measurements known as of the moment, oldest first."""
    series, n = ctx.upto(ANY)
    measurements = [
        {"code": series.codes[i], "time": series.times[i].isoformat(), "value": series.values[i]}
        for i in range(n)
    ]
    return {"resourceType": "MeasurementHistory", "asOf": ctx.at.isoformat(), "measurement": measurements}


def _fhirpath(ctx: AsOf, expression: str) -> Value:
    result = _fhirpath_evaluator(expression)(json_view(ctx), {"asOf": ctx.at.isoformat()})
    if not result:
        return None
    first = result[0]
    if isinstance(first, bool):
        return 1.0 if first else 0.0
    if isinstance(first, int | float | Decimal):  # fhirpathpy gives decimals as Decimal
        return float(first)
    return None


@dataclass(frozen=True)
class Function:
    impl: Callable[..., Value]
    args: tuple[str, ...]  # "code" / "fhirpath" (string literals) or "days" (a number or a param name)
    optional: int = 0
    doc: str = ""


FUNCTIONS: dict[str, Function] = {
    "latest": Function(_latest, ("code",), doc="the most recent value (and its time)"),
    "baseline": Function(_baseline, ("code",), doc="the first value ever recorded (and its time)"),
    "change": Function(_change, ("code",), doc="latest minus baseline (needs two values)"),
    "change_pct": Function(_change_pct, ("code",), doc="change as a percentage of the baseline"),
    "days_since_baseline": Function(_days_since_baseline, ("code",), doc="days from baseline to latest"),
    "weeks_since_baseline": Function(
        _weeks_since_baseline, ("code",), doc="whole weeks from baseline to latest"
    ),
    "days_since_last": Function(
        _days_since_last,
        ("code",),
        optional=1,
        doc='days from the latest value (of any code with "*", the default) to the evaluation moment; '
        "from the start of the enrollment when there is none",
    ),
    "fhirpath": Function(
        _fhirpath,
        ("fhirpath",),
        doc="a FHIRPath expression over {measurement: [{code, time, value}, ...]} as of the moment "
        "(oldest first; %asOf is the moment); its first result as a number (true = 1)",
    ),
    "count": Function(_count, ("code", "days"), doc="how many values in the last `days` days (inclusive)"),
    "min": Function(_extreme(False), ("code", "days"), doc="the lowest value in the last `days` days"),
    "max": Function(_extreme(True), ("code", "days"), doc="the highest value in the last `days` days"),
}


LATEST_ONLY = frozenset({"latest", "days_since_last"})

# -- expressions --------------------------------------------------------------------------------

_BINOPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b if b else math.nan,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
}


@dataclass(frozen=True)
class Expr:
    source: str
    tree: ast.expr
    codes: frozenset[str]

    @property
    def functions(self) -> frozenset[str]:
        return frozenset(
            n.func.id for n in ast.walk(self.tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        )


def compile_expr(source: Any, where: str, names: set[str], params: Mapping[str, float]) -> Expr:
    """Parse and check an expression; raises ValueError naming ``where``."""
    if isinstance(source, bool) or not isinstance(source, str | int | float):
        raise ValueError(f"{where}: must be an expression (text)")
    text = str(source)
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"{where}: not a valid expression ({exc.msg}): {text!r}") from None
    codes: set[str] = set()
    _check(tree, where, names, params, codes)
    return Expr(text, tree, frozenset(codes))


def _check(node: ast.AST, where: str, names: set[str], params: Mapping[str, float], codes: set[str]) -> None:
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, where, names, params, codes)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        _check(node.operand, where, names, params, codes)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check(node.left, where, names, params, codes)
        _check(node.right, where, names, params, codes)
    elif isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
        _check(node.left, where, names, params, codes)
        for comparator in node.comparators:
            _check(comparator, where, names, params, codes)
    elif (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        pass
    elif isinstance(node, ast.Name):
        if node.id not in names and node.id not in params:
            known = ", ".join(sorted(names | set(params))) or "none"
            raise ValueError(f"{where}: unknown name {node.id!r} (known: {known})")
    elif isinstance(node, ast.Call):
        fname = node.func.id if isinstance(node.func, ast.Name) else None
        fn = FUNCTIONS.get(fname or "")
        if fn is None or node.keywords:
            raise ValueError(
                f"{where}: unknown function {fname or ast.unparse(node.func)!r} "
                f"(use one of {', '.join(FUNCTIONS)})"
            )
        if not len(fn.args) - fn.optional <= len(node.args) <= len(fn.args):
            raise ValueError(
                f"{where}: {fname}() takes ({', '.join(fn.args)}), got {len(node.args)} argument(s)"
            )
        for kind, arg in zip(fn.args, node.args, strict=False):
            if kind == "fhirpath":
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.strip()):
                    raise ValueError(f"{where}: fhirpath() needs a FHIRPath expression in quotes")
                problems = syntax_errors(arg.value)
                if problems:
                    raise ValueError(f"{where}: fhirpath({arg.value!r}): {'; '.join(problems)}")
                codes.add(ANY)  # it may read any code
            elif kind == "code":
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value):
                    raise ValueError(
                        f'{where}: {fname}() needs a measurement code in quotes, e.g. "phq9.total"'
                    )
                codes.add(arg.value)
            else:
                ok = (
                    isinstance(arg, ast.Constant) and isinstance(arg.value, int | float) and arg.value > 0
                ) or (isinstance(arg, ast.Name) and arg.id in params)
                if not ok:
                    raise ValueError(f"{where}: {fname}() needs a positive number of days (or a param name)")
        if fname == "days_since_last" and not node.args:
            codes.add(ANY)
    else:
        raise ValueError(f"{where}: {ast.unparse(node)!r} is not allowed in a rule expression")


def evaluate(node: ast.expr, ctx: AsOf, env: Mapping[str, Value]) -> Value | bool:
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(bool(evaluate(v, ctx, env)) for v in node.values)
        return any(bool(evaluate(v, ctx, env)) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        inner = evaluate(node.operand, ctx, env)
        if isinstance(node.op, ast.Not):
            return not bool(inner)
        value = num(inner) if not isinstance(inner, bool) else float(inner)
        return None if value is None else -value
    if isinstance(node, ast.BinOp):
        left, right = _number(evaluate(node.left, ctx, env)), _number(evaluate(node.right, ctx, env))
        if left is None or right is None:
            return None
        result = _BINOPS[type(node.op)](left, right)
        return None if math.isnan(result) else result
    if isinstance(node, ast.Compare):
        left = _number(evaluate(node.left, ctx, env))
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _number(evaluate(comparator, ctx, env))
            if left is None or right is None or not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)
        return float(node.value)
    if isinstance(node, ast.Name):
        return env.get(node.id)
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    fn = FUNCTIONS[node.func.id]
    args: list[Any] = []
    for kind, arg in zip(fn.args, node.args, strict=False):
        if kind in ("code", "fhirpath"):
            assert isinstance(arg, ast.Constant)
            args.append(arg.value)
        else:
            args.append(_number(evaluate(arg, ctx, env)))
    return fn.impl(ctx, *args)


def _number(value: Value | bool) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return num(value)


# -- rules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlagAction:
    category: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class TaskAction:
    text: str
    priority: str


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    trigger: str
    params: Mapping[str, float]
    let: tuple[tuple[str, Expr], ...]
    when: Expr
    reason: str
    priority: str
    flag: FlagAction | None
    task: TaskAction | None
    source: str
    enabled: bool = True

    @property
    def codes(self) -> frozenset[str]:
        out = set(self.when.codes)
        for _, expr in self.let:
            out |= expr.codes
        return frozenset(out)

    @property
    def latest_only(self) -> bool:
        """Whether the rule reads nothing but the latest value of each code (so its history can be just
        those: what makes the schedule run cheap for absence rules)."""
        used: set[str] = set(self.when.functions)
        for _, expr in self.let:
            used |= expr.functions
        return used <= LATEST_ONLY

    def check(self, ctx: AsOf) -> tuple[bool, dict[str, Value]]:
        """Whether the rule's condition holds as of ``ctx.at``, and the named values it computed."""
        env: dict[str, Value] = dict(self.params)
        for name, expr in self.let:
            value = evaluate(expr.tree, ctx, env)
            env[name] = float(value) if isinstance(value, bool) else value
        return bool(evaluate(self.when.tree, ctx, env)), env

    def explain(self, env: Mapping[str, Value]) -> str:
        """The reason text with its placeholders filled: ``{name}``, ``{name.date}``, ``{name:.0f}``."""

        def fill(match: re.Match[str]) -> str:
            value = env.get(match.group(1))
            if match.group(2):
                return value.local_date() if isinstance(value, Val) else "?"
            number = num(value)
            if number is None:
                return "?"
            spec = match.group(3)
            if spec:
                shown = format(number, spec)
                return shown[1:] if re.fullmatch(r"[-+]0(?:\.0*)?%?", shown) else shown
            return str(int(number)) if float(number).is_integer() else f"{number:.1f}"

        return _PLACEHOLDER.sub(fill, self.reason)


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]

    def enabled(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.enabled)

    def by_id(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


@dataclass
class EpisodeState:
    """Per (patient, rule): an alert is open (not acknowledged), and/or its episode is ongoing."""

    open: bool = False
    ongoing: bool = False


@dataclass(frozen=True)
class Event:
    """``fired`` (a new alert, with its reason) or ``ended`` (the condition no longer holds)."""

    kind: str
    rule: Rule
    at: datetime
    reason: str = ""


def run_rule(
    rule: Rule, history: History, moments: Iterable[datetime], state: EpisodeState, *, end_only: bool = False
) -> list[Event]:
    """Evaluate ``rule`` as of each moment in order, updating ``state``; one source of truth for the
    episode logic (the database engine and ``fhir-bridge rules test`` both use it).

    ``end_only``: a schedule rule seen when data arrives. It fires only on the schedule; data can only
    end its ongoing episode (e.g. the patient is back), so without one there is nothing to evaluate.
    """
    events: list[Event] = []
    for moment in moments:
        if end_only and not state.ongoing:
            break
        holds, env = rule.check(AsOf(history, moment))
        if holds and end_only:
            continue
        if holds:
            if not state.ongoing and not state.open:
                state.open = state.ongoing = True
                events.append(Event("fired", rule, moment, rule.explain(env)))
        elif state.ongoing:
            state.ongoing = False
            events.append(Event("ended", rule, moment))
    return events


def data_moments(rule: Rule, points: Iterable[tuple[str, datetime]]) -> list[datetime]:
    """The moments a data-triggered evaluation looks at: each new measurement the rule reads."""
    codes = rule.codes  # a property that builds a new set: once per call, not once per point
    if ANY in codes:
        return sorted({at for _, at in points})
    return sorted({at for code, at in points if code in codes})


def simulate(
    rules: RuleSet,
    rows: Sequence[tuple[str, datetime, float, int]],
    now: datetime,
    *,
    since: datetime | None = None,
) -> list[Event]:
    """What would fire for this history arriving at once, then a schedule run at ``now``."""
    history = History(rows, since=since or (min((r[1] for r in rows), default=None)))
    points = [(code, at) for code, at, _, _ in rows]
    events: list[Event] = []
    for rule in rules.enabled():
        state = EpisodeState()
        scheduled = rule.trigger == "schedule"
        events += run_rule(rule, history, data_moments(rule, points), state, end_only=scheduled)
        if scheduled:
            events += run_rule(rule, history, [now], state)
    return sorted(events, key=lambda e: e.at)


_RULE_KEYS = {
    "id",
    "title",
    "trigger",
    "params",
    "let",
    "when",
    "reason",
    "priority",
    "flag",
    "task",
    "enabled",
}


def parse_rule(raw: Any, where: str, source: str) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: each rule must be a mapping")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not RULE_ID.match(rule_id):
        raise ValueError(f"{where}.id: required, lower-case letters, digits and - (at most 100)")
    where = f"{where} ({rule_id})"
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"{where}.enabled: must be true or false")
    if set(raw) <= {"id", "enabled"} and not enabled:
        return _disabled(rule_id, source)
    title = raw.get("title", rule_id)
    if not isinstance(title, str) or not 1 <= len(title) <= 200:
        raise ValueError(f"{where}.title: text of 1-200 characters")
    trigger = raw.get("trigger", "data")
    if trigger not in ("data", "schedule"):
        raise ValueError(f"{where}.trigger: must be data or schedule")
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict):
        raise ValueError(f"{where}.params: must be a mapping of names to numbers")
    params: dict[str, float] = {}
    for name, value in params_raw.items():
        if not isinstance(name, str) or not _NAME.match(name) or name in FUNCTIONS:
            raise ValueError(f"{where}.params.{name}: names are lower-case identifiers, not function names")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}.params.{name}: must be a number")
        params[name] = float(value)
    let_raw = raw.get("let") or {}
    if not isinstance(let_raw, dict):
        raise ValueError(f"{where}.let: must be a mapping of names to expressions")
    names: set[str] = set()
    let: list[tuple[str, Expr]] = []
    for name, source_expr in let_raw.items():
        if not isinstance(name, str) or not _NAME.match(name) or name in FUNCTIONS or name in params:
            raise ValueError(
                f"{where}.let.{name}: names are lower-case identifiers, unique, not function names"
            )
        let.append((name, compile_expr(source_expr, f"{where}.let.{name}", names, params)))
        names.add(name)
    if "when" not in raw:
        raise ValueError(f"{where}.when: required (the condition)")
    when = compile_expr(raw["when"], f"{where}.when", names, params)
    if not when.codes and not any(e.codes for _, e in let):
        raise ValueError(f"{where}.when: the condition reads no measurement")
    reason = raw.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise ValueError(f"{where}.reason: required text of at most 500 characters")
    for match in _PLACEHOLDER.finditer(reason):
        if match.group(1) not in names and match.group(1) not in params:
            raise ValueError(f"{where}.reason: {{{match.group(1)}}} names nothing in let or params")
        if match.group(3) is not None and not _FORMAT_SPEC.match(match.group(3)):
            raise ValueError(f"{where}.reason: bad number format {match.group(3)!r} (e.g. .0f, +.0f)")
    if re.search(r"\{(?![a-z_][a-z0-9_]*(?:\.date)?(?::[^{}]*)?\})", reason):
        raise ValueError(
            f"{where}.reason: a {{...}} placeholder is malformed (use {{name}}, {{name.date}}, {{name:.0f}})"
        )
    priority = raw.get("priority", "routine")
    if priority not in PRIORITIES:
        raise ValueError(f"{where}.priority: one of {', '.join(PRIORITIES)}")
    flag = _flag(raw.get("flag"), f"{where}.flag")
    task = _task(raw.get("task"), f"{where}.task", priority)
    if flag is None and task is None:
        raise ValueError(f"{where}: needs a flag, a task, or both (what the EHR should show)")
    return Rule(
        rule_id, title, trigger, params, tuple(let), when, reason, priority, flag, task, source, enabled
    )


def _disabled(rule_id: str, source: str) -> Rule:
    never = Expr("0", ast.Constant(0), frozenset())
    return Rule(rule_id, rule_id, "data", {}, (), never, "-", "routine", None, None, source, False)


def _flag(raw: Any, where: str) -> FlagAction | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"category", "text"}:
        raise ValueError(f"{where}: a mapping with category and text")
    category = raw.get("category") or ["clinical"]
    if isinstance(category, str):
        category = [category]
    if not isinstance(category, list) or not all(c in FLAG_CATEGORIES for c in category):
        raise ValueError(f"{where}.category: codes from {', '.join(FLAG_CATEGORIES)}")
    text = raw.get("text")
    if not isinstance(text, str) or not 1 <= len(text) <= 200:
        raise ValueError(f"{where}.text: required, 1-200 characters")
    return FlagAction(tuple(category), text)


def _task(raw: Any, where: str, priority: str) -> TaskAction | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"text", "priority"}:
        raise ValueError(f"{where}: a mapping with text (and priority)")
    text = raw.get("text")
    if not isinstance(text, str) or not 1 <= len(text) <= 200:
        raise ValueError(f"{where}.text: required, 1-200 characters")
    task_priority = raw.get("priority", priority)
    if task_priority not in PRIORITIES:
        raise ValueError(f"{where}.priority: one of {', '.join(PRIORITIES)}")
    return TaskAction(text, task_priority)


def parse_file(path: Path) -> list[Rule]:
    """The rules of one file; raises RuleFileError naming the file and each bad field."""
    name = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RuleFileError([f"{name}: cannot be read ({exc.strerror})"]) from None
    except yaml.YAMLError as exc:
        raise RuleFileError([f"{name}: not valid YAML ({exc})"]) from None
    if not isinstance(data, dict):
        raise RuleFileError([f"{name}: must be a mapping with apiVersion and rules"])
    problems: list[str] = []
    if data.get("apiVersion") != API_VERSION:
        problems.append(f"{name}: apiVersion: must be {API_VERSION!r}, got {data.get('apiVersion')!r}")
    extra = set(data) - {"apiVersion", "rules"}
    if extra:
        problems.append(f"{name}: unknown top-level field(s) {', '.join(sorted(map(str, extra)))}")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list):
        problems.append(f"{name}: rules: must be a list")
        raw_rules = []
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules):
        try:
            rule = parse_rule(raw, f"{name}: rules[{index}]", name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if rule.id in seen:
            problems.append(f"{name}: rules[{index}].id: {rule.id!r} appears twice in this file")
        seen.add(rule.id)
        rules.append(rule)
    if problems:
        raise RuleFileError(problems)
    return rules


def load_dir(directory: Path) -> list[Rule]:
    if not directory.is_dir():
        raise RuleFileError([f"{directory}: not a directory of rule files"])
    rules: list[Rule] = []
    problems: list[str] = []
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        try:
            rules += parse_file(path)
        except RuleFileError as exc:
            problems += exc.problems
    if problems:
        raise RuleFileError(problems)
    return rules


def load_rules(*overrides: Path | None) -> RuleSet:
    """The shipped defaults, then each override directory in turn: a rule with the same id replaces one
    loaded before it (``enabled: false`` with just the id turns it off); new ids are added."""
    merged: dict[str, Rule] = {rule.id: rule for rule in load_dir(DEFAULTS_DIR)}
    for directory in overrides:
        if directory is None:
            continue
        for rule in load_dir(directory):
            merged[rule.id] = rule
    return RuleSet(tuple(merged.values()))


__all__ = [
    "ANY",
    "API_VERSION",
    "FUNCTIONS",
    "AsOf",
    "EpisodeState",
    "Event",
    "History",
    "Rule",
    "RuleFileError",
    "RuleSet",
    "Val",
    "load_dir",
    "load_rules",
    "parse_file",
    "run_rule",
    "simulate",
]
