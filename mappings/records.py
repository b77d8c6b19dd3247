"""Validation of one record's ``data`` with marshmallow: compiled once per spec, run once per record.

Each failure carries a stable machine code (:class:`Problem` is a ``str`` that also has ``.code``, so it
travels through marshmallow's error collection untouched) and a message for the vendor's developer that
never repeats the submitted value. Timestamps must carry a time zone and may not lie in the future
beyond the catalogue's tolerance; the "now" they are checked against comes from the record's
:class:`~mappings.model.MappingContext` through marshmallow's context, so a compiled schema is shared by
every request and thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, TypedDict

from marshmallow import RAISE, Schema, ValidationError, fields, missing
from marshmallow.experimental.context import Context

from mappings.model import Rejection
from mappings.spec import AnswerOption, FieldSpec, ItemSpec, QuestionnaireSpec
from mappings.units import convert

EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
"""Nothing an app recorded is older than this; earlier timestamps are typing or clock errors."""

_MAX_OFFSET = timedelta(hours=14)  # FHIR dateTime offsets run from -14:00 to +14:00
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class Problem(str):
    """An error message that carries its machine code through marshmallow (which may ``.format`` it)."""

    code: str

    def __new__(cls, code: str, message: str) -> Problem:
        obj = super().__new__(cls, message)
        obj.code = code
        return obj

    def format(self, *args: object, **kwargs: object) -> Problem:
        return Problem(self.code, str.format(self, *args, **kwargs))


class RecordContext(TypedDict):
    latest: datetime  # received_at + tolerance: later timestamps are "in the future"


RECORD_CONTEXT = Context[RecordContext]

_COMMON: dict[str, str | list[Any] | dict[Any, Any]] = {
    "required": Problem("missing", "This field is required."),
    "null": Problem("missing", "This field is required and may not be null."),
}


def _num(value: Any) -> float | int:
    """A JSON number (never a boolean, NaN or infinity), or a ``wrong-type`` error."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(Problem("wrong-type", "Must be a number."))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(Problem("wrong-type", "Must be a finite number."))
    if isinstance(value, int) and abs(value) > 2**53:  # would lose precision (or overflow) as a float
        raise ValidationError(Problem("out-of-range", "The number is far outside the accepted range."))
    return value


def _range_error(minimum: float, maximum: float, unit: str = "") -> ValidationError:
    suffix = f" {unit}" if unit else ""
    return ValidationError(Problem("out-of-range", f"Must be between {minimum:g} and {maximum:g}{suffix}."))


class _Field(fields.Field):  # type: ignore[type-arg]
    default_error_messages = _COMMON


class DateTimeField(_Field):
    """ISO 8601 date and time with a UTC offset, not in the future, not before 1900."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            raise ValidationError(Problem("wrong-type", "Must be an ISO 8601 date-time text."))
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValidationError(
                Problem("invalid-date-time", "Not an ISO 8601 date-time (e.g. 2024-05-01T08:30:00+02:00).")
            ) from None
        offset = parsed.utcoffset()
        if offset is None:
            raise ValidationError(
                Problem(
                    "no-timezone",
                    "The date-time has no time zone; add the UTC offset (e.g. +02:00) or Z for UTC.",
                )
            )
        if offset.microseconds or offset.seconds % 60 or abs(offset) > _MAX_OFFSET:
            raise ValidationError(
                Problem(
                    "invalid-date-time", "The UTC offset must be whole minutes between -14:00 and +14:00."
                )
            )
        if parsed < EARLIEST:
            raise ValidationError(Problem("too-early", "The date-time is before 1900."))
        latest = RECORD_CONTEXT.get()["latest"]
        if parsed > latest:
            raise ValidationError(
                Problem("in-future", "The date-time is later than the time the record was received.")
            )
        return parsed


class DateField(_Field):
    """A calendar day (YYYY-MM-DD), not after the latest day it can be anywhere on Earth."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> date:
        if not isinstance(value, str) or not _DATE.match(value):
            raise ValidationError(Problem("invalid-date", "Must be a date in the form YYYY-MM-DD."))
        try:
            parsed = date.fromisoformat(value)
        except ValueError:
            raise ValidationError(Problem("invalid-date", "Not a real calendar date.")) from None
        if parsed < EARLIEST.date():
            raise ValidationError(Problem("too-early", "The date is before 1900."))
        latest = RECORD_CONTEXT.get()["latest"]
        if parsed > (latest.astimezone(UTC) + _MAX_OFFSET).date():
            raise ValidationError(Problem("in-future", "The date has not begun anywhere yet."))
        return parsed


class IntegerField(_Field):
    def __init__(self, *, minimum: float, maximum: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum, self.maximum = minimum, maximum

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        number = _num(value)
        if isinstance(number, float):
            if not number.is_integer():
                raise ValidationError(Problem("wrong-type", "Must be a whole number."))
            number = int(number)
        if not self.minimum <= number <= self.maximum:
            raise _range_error(self.minimum, self.maximum)
        return number


def _rounded(value: float, decimals: int) -> float | int:
    """Half away from zero, on the decimal text of the value (Python's round() rounds half to even)."""
    exact = Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return int(exact) if decimals == 0 else float(exact)


class DecimalField(_Field):
    def __init__(self, *, minimum: float, maximum: float, decimals: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum, self.maximum, self.decimals = minimum, maximum, decimals

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float | int:
        number = float(_num(value))
        if not self.minimum - 1 <= number <= self.maximum + 1:  # before rounding: 1e308 cannot be rounded
            raise _range_error(self.minimum, self.maximum)
        number = _rounded(number, self.decimals)
        if not self.minimum <= number <= self.maximum:
            raise _range_error(self.minimum, self.maximum)
        return number


class QuantityField(_Field):
    """A number in the canonical unit, or ``{"value": n, "unit": "<accepted UCUM unit>"}`` converted to it."""

    def __init__(
        self,
        *,
        unit: str,
        accept: tuple[str, ...],
        minimum: float,
        maximum: float,
        decimals: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.unit, self.accept = unit, accept
        self.minimum, self.maximum, self.decimals = minimum, maximum, decimals

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float | int:
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"value", "unit"})
            errors: dict[str, Any] = {
                key: [Problem("unknown-field", "Unknown field; a quantity has `value` and `unit`.")]
                for key in unknown
            }
            unit = value.get("unit")
            if "value" not in value or value["value"] is None:
                errors["value"] = [Problem("missing", "This field is required.")]
            if unit is None:
                errors["unit"] = [Problem("missing", f"This field is required ({', '.join(self.accept)}).")]
            elif unit not in self.accept:
                errors["unit"] = [
                    Problem(
                        "unit-not-convertible",
                        f"Cannot convert this unit to {self.unit}; use one of: {', '.join(self.accept)}"
                        " (UCUM codes).",
                    )
                ]
            if "value" in value and value["value"] is not None:
                try:
                    number = float(_num(value["value"]))
                except ValidationError as exc:
                    errors["value"] = exc.messages
            if errors:
                raise ValidationError(errors)
            assert isinstance(unit, str)  # checked above: one of self.accept
            number = convert(number, unit, self.unit)
        else:
            number = float(_num(value))
        if not self.minimum - 1 <= number <= self.maximum + 1:  # before rounding: 1e308 cannot be rounded
            raise _range_error(self.minimum, self.maximum, self.unit)
        result = _rounded(number, self.decimals)
        if not self.minimum <= result <= self.maximum:
            raise _range_error(self.minimum, self.maximum, self.unit)
        return result


class AnswerField(_Field):
    """An answer given as its score (a number) or its code (text); yields the :class:`AnswerOption`."""

    def __init__(self, item: ItemSpec, options: tuple[AnswerOption, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.by_code: dict[str, AnswerOption] = {o.coding.code: o for o in options}
        for alias in item.accept_also:
            # Recorded as the answer it stands for, so the QuestionnaireResponse matches our Questionnaire.
            self.by_code[alias.coding.code] = self.by_code[alias.same_as]
        self.by_score: dict[float, AnswerOption] = {o.score: o for o in options if o.score is not None}
        codes = ", ".join(self.by_code)
        if self.by_score:
            scores = ", ".join(f"{s:g}" for s in sorted(self.by_score))
            self._hint = f"Give the answer's score ({scores}) or its code ({codes})."
        else:
            self._hint = f"Give the answer's code ({codes})."

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> AnswerOption:
        option: AnswerOption | None = None
        if isinstance(value, str):
            option = self.by_code.get(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            option = self.by_score.get(value)
        else:
            raise ValidationError(Problem("wrong-type", self._hint))
        if option is None:
            raise ValidationError(Problem("invalid-answer", "Not one of this item's answers. " + self._hint))
        return option


class RecordSchema(Schema):
    """Base of every compiled record schema: unknown members are errors (they are usually typos)."""

    class Meta:
        unknown = RAISE

    error_messages = {  # noqa: RUF012 - marshmallow reads this class attribute
        "unknown": Problem(
            "unknown-field", "Unknown field; see the measure's data shape in mappings/README.md."
        ),
        "type": Problem("wrong-type", "Must be a JSON object."),
    }


class _Nested(fields.Nested):
    default_error_messages: dict[str, str | list[Any] | dict[Any, Any]] = {  # noqa: RUF012 - read by marshmallow
        **_COMMON,
        "type": Problem("wrong-type", "Must be a JSON object."),
    }


def _build(name: str, members: dict[str, fields.Field]) -> Schema:  # type: ignore[type-arg]
    cls = RecordSchema.from_dict(members, name=name)
    return cls()


def observation_schema(measure: str, specs: tuple[FieldSpec, ...]) -> Schema:
    members: dict[str, fields.Field] = {}  # type: ignore[type-arg]
    for f in specs:
        common: dict[str, Any] = {"required": f.required, "allow_none": not f.required}
        if f.type == "date-time":
            members[f.name] = DateTimeField(**common)
        elif f.type == "date":
            members[f.name] = DateField(**common)
        elif f.type == "integer":
            assert f.minimum is not None and f.maximum is not None
            members[f.name] = IntegerField(minimum=f.minimum, maximum=f.maximum, **common)
        elif f.type == "decimal":
            assert f.minimum is not None and f.maximum is not None and f.decimals is not None
            members[f.name] = DecimalField(
                minimum=f.minimum, maximum=f.maximum, decimals=f.decimals, **common
            )
        else:
            assert f.unit is not None and f.minimum is not None and f.maximum is not None
            assert f.decimals is not None
            members[f.name] = QuantityField(
                unit=f.unit.code,
                accept=f.accept_units,
                minimum=f.minimum,
                maximum=f.maximum,
                decimals=f.decimals,
                **common,
            )
    return _build(f"{measure}-data", members)


def questionnaire_schema(spec: QuestionnaireSpec) -> Schema:
    answers: dict[str, fields.Field] = {  # type: ignore[type-arg]
        item.name: AnswerField(
            item, spec.answer_lists[item.answers], required=item.required, allow_none=not item.required
        )
        for item in spec.items
    }
    answers_schema = RecordSchema.from_dict(answers, name=f"{spec.id}-answers")
    return _build(
        f"{spec.id}-data",
        {"authored": DateTimeField(required=True), "answers": _Nested(answers_schema, required=True)},
    )


def rejections(messages: Any, path: str = "") -> list[Rejection]:
    """Flatten marshmallow's nested error messages into rejections with dotted field paths."""
    out: list[Rejection] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                out += rejections(value, path or "data")
            else:
                out += rejections(value, f"{path}.{key}" if path else str(key))
    elif isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict | list):
                out += rejections(message, path)
            else:
                code = message.code if isinstance(message, Problem) else "invalid"
                out.append(Rejection(code, path or "data", str(message)))
    else:
        code = messages.code if isinstance(messages, Problem) else "invalid"
        out.append(Rejection(code, path or "data", str(messages)))
    return out


_ABSENT = object()
FastLoad = Callable[[Any], "dict[str, Any] | None"]


class _Invalid(Exception):
    """A nested fast load did not pass (the caller falls back to the schema for the messages)."""


def fast_loader(schema: Schema) -> FastLoad | None:
    """``schema.load`` for the valid case without marshmallow's machinery, or None if not supported.

    The returned function gives exactly what ``schema.load(data)`` would for data that passes, and
    None for anything else: the caller then runs ``schema.load`` itself, so every rejection keeps the
    schema's code, path and message. Only the schemas this module compiles qualify (unknown fields
    raise, no hooks, validators, data keys or defaults; our field classes and nested record schemas),
    so the per-field checks run are the same ``_deserialize`` methods. Profiling the push path showed
    marshmallow's per-field bookkeeping at a third of its CPU.
    """
    if schema.many or schema.partial or schema.unknown != RAISE or any(schema._hooks.values()):
        return None
    plan: list[tuple[str, bool, bool, Callable[[Any, str, Any], Any]]] = []
    for name, field in schema.load_fields.items():
        if (
            field.data_key is not None
            or field.attribute is not None
            or field.validators
            or field.pre_load
            or field.post_load
            or field.load_default is not missing
        ):
            return None
        if isinstance(field, _Nested):
            inner = fast_loader(field.schema)
            if inner is None or field.many or field.only or field.exclude or field.unknown:
                return None
            plan.append((name, field.required, field.allow_none, _nested_step(inner)))
        elif isinstance(field, _Field):
            plan.append((name, field.required, field.allow_none, field._deserialize))
        else:
            return None
    known = frozenset(name for name, *_ in plan)

    def load(data: Any) -> dict[str, Any] | None:
        if type(data) is not dict or not data.keys() <= known:
            return None
        out: dict[str, Any] = {}
        for name, required, allow_none, step in plan:
            value = data.get(name, _ABSENT)
            if value is _ABSENT:
                if required:
                    return None
                continue
            if value is None:
                if not allow_none:
                    return None
                out[name] = None
                continue
            try:
                out[name] = step(value, name, data)
            except (ValidationError, _Invalid):
                return None
        return out

    return load


def _nested_step(inner: FastLoad) -> Callable[[Any, str, Any], Any]:
    def step(value: Any, attr: str, data: Any) -> dict[str, Any]:
        loaded = inner(value)
        if loaded is None:
            raise _Invalid
        return loaded

    return step
