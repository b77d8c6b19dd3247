"""Rules against the database: the measurement ledger, evaluation, alerts, and their Flag/Task in the outbox.

* :func:`on_accepted` runs inside the vendor push transaction (one call from :mod:`fhir_bridge.push`):
  it adds the accepted records' measurements to the ledger and evaluates the tenant's rules for each
  patient touched, as of each new measurement a rule reads, in time order. So an alert, its Flag/Task
  in the outbox, and the data that caused it commit together or not at all; a replayed push adds no
  measurement (its records are duplicates) and so fires nothing.
* :func:`run_scheduled_rules` evaluates ``trigger: schedule`` rules (absence of data) as of now, for
  every active enrollment; the scheduler (:mod:`fhir_bridge.scheduler`) calls it through
  :func:`maybe_run_scheduled`, which makes sure one worker at a time runs it, at most once per
  ``RULES_SCHEDULE_SECONDS``.
* An alert is one *episode*: while it is open, or while its condition has held at every evaluation
  since it fired, the rule does not fire again for that patient. The database enforces at most one
  open alert per (tenant, patient, rule).
* :func:`acknowledged` (called by the dashboard's acknowledge action) queues the EHR side: the Flag
  set ``inactive``, the Task ``completed``, as an upsert of the same outbox row
  (:func:`fhir_bridge.delivery.outbox.put`: a conditional update by identifier, sent after any write
  of the older version still in flight).

Identifiers are deterministic: ``sha256(tenant|patient|rule|trigger time)``, so the same history
always produces the same Flag/Task identifiers, and the outbox's unique identifier makes a second
queueing impossible.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import orjson
from sqlalchemy import Table, bindparam, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fhir_bridge.delivery import outbox
from fhir_bridge.rules.model import (
    ANY,
    EpisodeState,
    History,
    Rule,
    RuleFileError,
    RuleSet,
    data_moments,
    load_rules,
    run_rule,
)
from fhir_bridge.storage.bulk import BulkInsert
from fhir_bridge.storage.models import Alert, Enrollment, Measurement, OutboxItem, SchedulerLease
from mappings.identity import CANONICAL

if TYPE_CHECKING:
    from fhir_bridge.push import Prepared
    from fhir_bridge.storage import Database

log = logging.getLogger(__name__)

ALERT_SYSTEM = CANONICAL + "/sid/alert"
# Outbox rows that update an alert's Flag/Task carry this system (the resource keeps ALERT_SYSTEM).
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
SCHEDULE_LEASE = "rules-schedule"
_MEASUREMENTS = cast(Table, Measurement.__table__)
_PG_SCHEDULE_LOCK = int.from_bytes(
    hashlib.sha256(b"fhir-bridge rules schedule").digest()[:8], "big", signed=True
)


# -- which rules apply ----------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _ruleset(rules_dir: str | None, tenant_id: str) -> RuleSet:
    if rules_dir is None:
        return load_rules()
    base = Path(rules_dir)
    tenant_dir = base / tenant_id
    shared = base if any(base.glob("*.y*ml")) else None
    return load_rules(shared, tenant_dir if tenant_dir.is_dir() else None)


def configured_rules_dir() -> Path | None:
    """``RULES_DIR`` of the running app (None outside a Flask app: the shipped defaults)."""
    from flask import current_app, has_app_context

    if not has_app_context():
        return None
    from fhir_bridge import services

    try:
        return services.from_app(current_app).settings.rules_dir
    except (KeyError, AttributeError):
        return None


def ruleset_for(tenant_id: str, rules_dir: Path | None = None) -> RuleSet:
    """The tenant's rules: shipped defaults, then ``RULES_DIR/*.yaml``, then ``RULES_DIR/<tenant>/*.yaml``."""
    return _ruleset(str(rules_dir) if rules_dir is not None else None, tenant_id)


def check_rules(rules_dir: Path | None) -> None:
    """Load every rule set the settings make reachable; a bad file stops start-up naming file and field."""
    ruleset_for("", rules_dir)
    if rules_dir is not None:
        if not rules_dir.is_dir():
            raise RuleFileError([f"FHIR_BRIDGE_RULES_DIR: {rules_dir} is not a directory"])
        for sub in sorted(p for p in rules_dir.iterdir() if p.is_dir()):
            ruleset_for(sub.name, rules_dir)


# -- the ledger -----------------------------------------------------------------------------------


class Point(NamedTuple):
    """A new measurement of a push (a tuple: a 1,000-record push makes a thousand of them)."""

    code: str
    at: datetime


@dataclass
class Touched:
    tenant_id: str
    patient_id: str
    enrollment_id: uuid.UUID
    points: list[Point]


_LEDGER_ROWS = BulkInsert(
    _MEASUREMENTS,
    varying=(
        "tenant_id",
        "patient_id",
        "enrollment_id",
        "record_id",
        "code",
        "at",
        "utc_offset_min",
        "value",
    ),
    constant=(),
)


def on_accepted(
    session: Session, prepared: Sequence[Prepared], now: datetime, *, rules_dir: Path | None = None
) -> list[Alert]:
    """Ledger rows for the accepted records, then rule evaluation per patient; returns alerts fired."""
    rows: list[tuple[Any, ...]] = []
    touched: dict[tuple[str, str], Touched] = {}
    last: Enrollment | None = None
    for p in prepared:
        measurements = getattr(p, "measurements", ())
        if not measurements or p.result.id is None:
            continue
        enrollment = p.enrollment
        if enrollment is not last:  # a batch is mostly one app user's: read the ORM attributes once
            last = enrollment
            tenant_id, patient_id, enrollment_id = enrollment.tenant_id, enrollment.patient_id, enrollment.id
            entry = touched.get((tenant_id, patient_id))
            if entry is None:
                entry = touched[(tenant_id, patient_id)] = Touched(tenant_id, patient_id, enrollment_id, [])
            points = entry.points
        record_pk = p.record_pk()
        for m in measurements:
            at = m.time
            offset = at.utcoffset()
            rows.append(
                (
                    tenant_id,
                    patient_id,
                    enrollment_id,
                    record_pk,
                    m.code,
                    at,
                    int(offset.total_seconds() // 60) if offset is not None else 0,
                    float(m.value),
                )
            )
            points.append(Point(m.code, at.astimezone(UTC)))
    if not rows:
        return []
    _LEDGER_ROWS.execute(session.connection(), rows, {})
    if rules_dir is None:
        rules_dir = configured_rules_dir()
    fired: list[Alert] = []
    # In (tenant, patient) order: two pushes locking the same patients always lock them in one order.
    for entry in sorted(touched.values(), key=lambda e: (e.tenant_id, e.patient_id)):
        fired += evaluate_patient(
            session,
            entry.tenant_id,
            entry.patient_id,
            entry.enrollment_id,
            entry.points,
            now=now,
            rules=ruleset_for(entry.tenant_id, rules_dir),
        )
    return fired


_PATIENT_LOCK = text("SELECT pg_advisory_xact_lock(:k)")


def _lock_patient(session: Session, tenant_id: str, patient_id: str) -> None:
    """Serialise evaluations of one patient on PostgreSQL (SQLite serialises every writer already)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.sha256(f"rules\x1f{tenant_id}\x1f{patient_id}".encode()).digest()
    session.connection().execute(_PATIENT_LOCK, {"k": int.from_bytes(digest[:8], "big", signed=True)})


def load_history(
    session: Session, tenant_id: str, patient_id: str, codes: Iterable[str], *, since: datetime | None = None
) -> History:
    wanted = set(codes)
    query = select(Measurement.code, Measurement.at, Measurement.value, Measurement.utc_offset_min).where(
        Measurement.tenant_id == tenant_id, Measurement.patient_id == patient_id
    )
    if ANY not in wanted:
        query = query.where(Measurement.code.in_(sorted(wanted)))
    rows = [(code, at, value, offset) for code, at, value, offset in session.execute(query)]
    return History(rows, since=since)


def load_latest(
    session: Session, tenant_id: str, patient_id: str, codes: Iterable[str], *, since: datetime | None = None
) -> History:
    """Only the latest measurement of each code (``*``: of any code), one index probe each: enough for
    rules that read nothing else (``Rule.latest_only``), e.g. absence of data on the schedule."""
    rows: list[tuple[str, datetime, float, int]] = []
    base = select(Measurement.code, Measurement.at, Measurement.value, Measurement.utc_offset_min).where(
        Measurement.tenant_id == tenant_id, Measurement.patient_id == patient_id
    )
    for code in sorted(set(codes)):
        query = base if code == ANY else base.where(Measurement.code == code)
        row = session.execute(query.order_by(Measurement.at.desc()).limit(1)).first()
        if row is not None:
            rows.append((row[0], row[1], row[2], row[3]))
    return History(rows, since=since)


# -- evaluation -----------------------------------------------------------------------------------


@dataclass
class Episode:
    """What the database says about one (patient, rule): its open alert and its ongoing episode."""

    open: Alert | None = None
    ongoing: Alert | None = None


# Built once: whether the patient has any open alert or ongoing episode (the usual answer is no).
_ALERTS: Table = cast(Table, Alert.__table__)
_ANY_EPISODE = (
    select(_ALERTS.c.id)
    .where(
        _ALERTS.c.tenant_id == bindparam("tenant_id"),
        _ALERTS.c.patient_id == bindparam("patient_id"),
        or_(_ALERTS.c.status == "open", _ALERTS.c.episode_ended_at.is_(None)),
    )
    .limit(1)
)


def _episodes(session: Session, tenant_id: str, patient_id: str) -> dict[str, Episode]:
    out: dict[str, Episode] = defaultdict(Episode)
    # Core first, on the session's connection (same transaction): loading no ORM objects through
    # the ORM cost most of the rules' share of a single-record push.
    params = {"tenant_id": tenant_id, "patient_id": patient_id}
    session.flush()  # what the ORM query would autoflush (alerts fired earlier in this transaction)
    if session.connection().execute(_ANY_EPISODE, params).first() is None:
        return out
    rows = session.scalars(
        select(Alert)
        .where(
            Alert.tenant_id == tenant_id,
            Alert.patient_id == patient_id,
            or_(Alert.status == "open", Alert.episode_ended_at.is_(None)),
        )
        .order_by(Alert.fired_at)
    )
    for alert in rows:
        episode = out[alert.rule_id]
        if alert.status == "open":
            episode.open = alert
        if alert.episode_ended_at is None:
            episode.ongoing = alert
    return out


def _any_ongoing(episodes: dict[str, Episode], candidates: list[tuple[Rule, list[datetime], bool]]) -> bool:
    return any(episodes[rule.id].ongoing is not None for rule, _, _ in candidates)


def evaluate_patient(
    session: Session,
    tenant_id: str,
    patient_id: str,
    enrollment_id: uuid.UUID | None,
    points: Sequence[Point],
    *,
    now: datetime,
    rules: RuleSet,
    schedule: bool = False,
    since: datetime | None = None,
) -> list[Alert]:
    """Evaluate ``rules`` as of each point a rule reads (``schedule``: the schedule rules as of ``now``).

    Cheap when nothing can happen: rules that read none of the new points are skipped, and so are
    schedule rules without an ongoing episode (data can only end one); the history is loaded only for
    the codes the remaining rules read.
    """
    candidates: list[tuple[Rule, list[datetime], bool]] = []
    pairs = [(p.code, p.at) for p in points]
    for rule in rules.enabled():
        if schedule:
            if rule.trigger == "schedule":
                candidates.append((rule, [now], False))
            continue
        moments = data_moments(rule, pairs)
        if moments:
            candidates.append((rule, moments, rule.trigger == "schedule"))
    if not candidates:
        return []
    # Only schedule rules read this data, and data can only end their episodes, which only a
    # schedule run (not a push) starts: with none ongoing there is nothing to do and no other push
    # can change that, so the answer needs no lock (a round trip saved on most wearable data).
    if (
        not schedule
        and all(end_only for _, _, end_only in candidates)
        and not _any_ongoing(_episodes(session, tenant_id, patient_id), candidates)
    ):
        return []
    if not schedule:
        # Not on the schedule: its transaction would hold every patient's lock until the run ends,
        # blocking their pushes. The race it leaves (a push and the run at once) is benign: the
        # open-alert index stops a second alert, and the next data ends an absence episode.
        _lock_patient(session, tenant_id, patient_id)
    episodes = _episodes(session, tenant_id, patient_id)
    plan = [c for c in candidates if not (c[2] and episodes[c[0].id].ongoing is None)]
    if not plan:
        return []
    codes: set[str] = set()
    for rule, _, _ in plan:
        codes |= rule.codes
    if schedule and all(rule.latest_only for rule, _, _ in plan):
        history = load_latest(session, tenant_id, patient_id, codes, since=since)
    else:
        history = load_history(session, tenant_id, patient_id, codes, since=since)
    fired: list[Alert] = []
    for rule, moments, end_only in plan:
        episode = episodes[rule.id]
        state = EpisodeState(open=episode.open is not None, ongoing=episode.ongoing is not None)
        for event in run_rule(rule, history, moments, state, end_only=end_only):
            if event.kind == "fired":
                alert = fire(
                    session, rule, tenant_id, patient_id, enrollment_id, event.at, event.reason, now=now
                )
                episode.open = episode.ongoing = alert
                fired.append(alert)
            elif episode.ongoing is not None:
                episode.ongoing.episode_ended_at = max(event.at, episode.ongoing.trigger_at or event.at)
                episode.ongoing = None
    return fired


def ident_value(tenant_id: str, patient_id: str, rule_id: str, trigger_at: datetime) -> str:
    stamp = trigger_at.astimezone(UTC).isoformat()
    return hashlib.sha256(f"{tenant_id}|{patient_id}|{rule_id}|{stamp}".encode()).hexdigest()[:40]


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def flag_resource(
    rule: Rule, patient_id: str, ident: str, reason: str, trigger_at: datetime
) -> dict[str, Any]:
    assert rule.flag is not None
    return {
        "resourceType": "Flag",
        "identifier": [{"system": ALERT_SYSTEM, "value": ident}],
        "status": "active",
        "category": [{"coding": [{"system": FLAG_CATEGORY, "code": code}]} for code in rule.flag.category],
        "code": {"text": f"{rule.flag.text}. {reason}"[:1000]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": {"start": _instant(trigger_at)},
    }


def task_resource(rule: Rule, patient_id: str, ident: str, reason: str, now: datetime) -> dict[str, Any]:
    assert rule.task is not None
    return {
        "resourceType": "Task",
        "identifier": [{"system": ALERT_SYSTEM, "value": ident}],
        "status": "requested",
        "intent": "order",
        "priority": rule.task.priority,
        "code": {"text": rule.task.text},
        "description": reason[:1000],
        "for": {"reference": f"Patient/{patient_id}"},
        "authoredOn": _instant(now),
        "reasonCode": {"text": rule.title},
    }


def fire(
    session: Session,
    rule: Rule,
    tenant_id: str,
    patient_id: str,
    enrollment_id: uuid.UUID | None,
    trigger_at: datetime,
    reason: str,
    *,
    now: datetime,
) -> Alert:
    """The alert row and its Flag/Task in the outbox (one group: one EHR transaction)."""
    ident = ident_value(tenant_id, patient_id, rule.id, trigger_at)
    alert = Alert(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        patient_id=patient_id,
        enrollment_id=enrollment_id,
        rule_id=rule.id,
        priority=rule.priority,
        status="open",
        reason=reason,
        fired_at=now,
        trigger_at=trigger_at,
        ident_value=ident,
    )
    items: dict[str, OutboxItem] = {}
    if rule.flag is not None:
        items["flag"] = _queue(
            tenant_id, "Flag", ident, flag_resource(rule, patient_id, ident, reason, trigger_at), now
        )
    if rule.task is not None:
        items["task"] = _queue(
            tenant_id, "Task", ident, task_resource(rule, patient_id, ident, reason, now), now
        )
    session.add_all(items.values())
    session.flush()
    alert.flag_outbox_id = items["flag"].id if "flag" in items else None
    alert.task_outbox_id = items["task"].id if "task" in items else None
    session.add(alert)
    session.flush()
    log.info("rule fired", extra={"tenant": tenant_id, "rule": rule.id, "alert": str(alert.id)})
    return alert


def _queue(
    tenant_id: str,
    resource_type: str,
    ident: str,
    resource: dict[str, Any],
    now: datetime,
) -> OutboxItem:
    return OutboxItem(
        tenant_id=tenant_id,
        record_id=None,
        group_key=ident,
        resource_type=resource_type,
        ident_system=ALERT_SYSTEM,
        ident_value=ident,
        body=orjson.dumps(resource),
        priority=0,
        status="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )


# -- the schedule ---------------------------------------------------------------------------------


def run_scheduled_rules(session: Session, now: datetime, *, rules_dir: Path | None = None) -> list[Alert]:
    """Evaluate every tenant's ``trigger: schedule`` rules as of ``now`` for every active enrollment.

    The caller makes sure one worker runs it at a time (:func:`maybe_run_scheduled`); the per-patient
    lock and the open-alert index make a concurrent run harmless anyway.
    """
    fired: list[Alert] = []
    enrollments = session.execute(
        select(
            Enrollment.tenant_id,
            Enrollment.patient_id,
            Enrollment.id,
            Enrollment.claimed_at,
            Enrollment.created_at,
        )
        .where(Enrollment.status == "active")
        .order_by(Enrollment.tenant_id, Enrollment.patient_id)
    ).all()
    seen: set[tuple[str, str]] = set()
    for tenant_id, patient_id, enrollment_id, claimed_at, created_at in enrollments:
        if (tenant_id, patient_id) in seen:
            continue
        seen.add((tenant_id, patient_id))
        rules = ruleset_for(tenant_id, rules_dir)
        if not any(r.trigger == "schedule" for r in rules.enabled()):
            continue
        try:
            with session.begin_nested():  # one patient's conflict must not undo the whole run
                fired += evaluate_patient(
                    session,
                    tenant_id,
                    patient_id,
                    enrollment_id,
                    (),
                    now=now,
                    rules=rules,
                    schedule=True,
                    since=claimed_at or created_at,
                )
        except IntegrityError:
            log.warning("scheduled rule raced a push; next run retries", extra={"tenant": tenant_id})
    return fired


def maybe_run_scheduled(
    db: Database,
    *,
    holder: str,
    interval_seconds: float,
    rules_dir: Path | None = None,
    now: datetime | None = None,
) -> int | None:
    """Run :func:`run_scheduled_rules` if it is due and no other worker is running it.

    Returns the number of alerts fired, or None when it was not this worker's turn. One transaction:
    the ``SchedulerLease`` row records the last run (on PostgreSQL an advisory lock keeps a second
    worker out meanwhile; SQLite's ``BEGIN IMMEDIATE`` does the same).
    """
    now = now or datetime.now(UTC)
    with db.transaction() as session:
        if session.get_bind().dialect.name == "postgresql":
            got = session.execute(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _PG_SCHEDULE_LOCK}
            ).scalar()
            if not got:
                return None
        lease = session.get(SchedulerLease, SCHEDULE_LEASE)
        last = lease.last_run_at if lease is not None else None
        if last is not None and now - last < timedelta(seconds=interval_seconds):
            return None
        if lease is None:
            lease = SchedulerLease(name=SCHEDULE_LEASE, holder=holder[:128], lease_until=now)
            session.add(lease)
        lease.holder = holder[:128]
        lease.lease_until = now + timedelta(seconds=interval_seconds)
        lease.last_run_at = now
        fired = run_scheduled_rules(session, now, rules_dir=rules_dir)
    if fired:
        log.info("scheduled rules fired", extra={"count": len(fired)})
    return len(fired)


# -- acknowledgement ------------------------------------------------------------------------------


def acknowledged(session: Session, alert: Alert, now: datetime) -> list[str]:
    """Queue the EHR side of an acknowledgement: Flag ``inactive``, Task ``completed``.

    The alert's own outbox row gets the new version (:func:`fhir_bridge.delivery.outbox.put`): sent as a
    conditional update by its identifier, whether the first version reached the EHR, is being sent right
    now (the new one goes after that send's lease) or was dead-lettered; the EHR ends up with the final
    state and still one resource. Returns the resource types queued.
    """
    done: list[str] = []
    for outbox_id, change in (
        (alert.flag_outbox_id, _flag_inactive),
        (alert.task_outbox_id, _task_completed),
    ):
        if outbox_id is None:
            continue
        item = session.get(OutboxItem, outbox_id, with_for_update=True)
        if item is None:
            continue
        outbox.put(
            session,
            tenant_id=item.tenant_id,
            resource=change(orjson.loads(item.body), now),
            ident_system=item.ident_system,
            ident_value=item.ident_value,
            now=now,
        )
        done.append(item.resource_type)
    session.flush()
    return done


def _flag_inactive(flag: dict[str, Any], now: datetime) -> dict[str, Any]:
    flag["status"] = "inactive"
    flag.setdefault("period", {})["end"] = _instant(now)
    return flag


def _task_completed(task: dict[str, Any], now: datetime) -> dict[str, Any]:
    task["status"] = "completed"
    task["lastModified"] = _instant(now)
    return task


__all__ = [
    "ALERT_SYSTEM",
    "acknowledged",
    "evaluate_patient",
    "maybe_run_scheduled",
    "on_accepted",
    "ruleset_for",
    "run_scheduled_rules",
]
