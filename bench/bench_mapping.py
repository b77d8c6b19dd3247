"""Mapping throughput: native records -> validated, mapped FHIR resources serialised for the outbox.

What is timed per record is what the push API does between parsing the request and writing the outbox:
``orjson.loads`` of the record, ``Catalog.map`` (marshmallow validation, filling the pre-validated
templates, FHIRPath scores) and ``orjson.dumps`` of every resource. The floor is the same records
through the same compiled marshmallow schemas and orjson, with no FHIR work at all, so the ratio says
what the FHIR part costs. A third row shows the naive design (building and validating every resource
with ``fhir.resources``) on a sample, for comparison. Figures are CPU seconds of this one process (one
core), median of several runs, floor and mapping interleaved so machine noise hits both alike.

    python -m bench mapping [--records 10000] [--runs 5] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from mappings import MappingContext, load_catalog
from mappings.fhir_models import validate_resource
from mappings.identity import device_full_url
from mappings.records import RECORD_CONTEXT

RECEIVED = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
VENDOR = "bench-vendor"

# A realistic day of an app with passive sensing: many small sensor records, few questionnaires.
MIX = {
    "steps-interval": 24,
    "mood": 14,
    "steps-daily": 9,
    "sleep-duration": 9,
    "resting-heart-rate": 9,
    "hrv": 9,
    "app-engagement": 9,
    "phq9": 5,
    "gad7": 5,
    "dwai": 3,
    "phq2": 2,
    "gad2": 2,
}


def _when(rng: random.Random) -> datetime:
    zone = timedelta(minutes=rng.choice([-300, -240, 0, 60, 120, 330, 600]))
    moment = RECEIVED - timedelta(seconds=rng.randrange(60, 90 * 86400))
    return moment.astimezone(timezone_of(zone))


def timezone_of(offset: timedelta) -> Any:
    from datetime import timezone

    return timezone(offset)


def _answers(rng: random.Random, items: int, low: int, high: int) -> dict[str, Any]:
    return {f"item{i}": rng.randint(low, high) for i in range(1, items + 1)}


def make_record(measure: str, rng: random.Random) -> dict[str, Any]:
    t = _when(rng)
    start = t - timedelta(hours=rng.randint(1, 10))
    if measure == "steps-interval":
        data: dict[str, Any] = {"start": start.isoformat(), "end": t.isoformat()}
        data["steps"] = rng.randint(0, 9000)
    elif measure == "mood":
        data = {"time": t.isoformat(), "rating": rng.randint(0, 10)}
    elif measure == "steps-daily":
        data = {"date": t.date().isoformat(), "steps": rng.randint(200, 25000)}
    elif measure == "sleep-duration":
        hours = rng.uniform(3, 10)
        duration: Any = round(hours * 60) if rng.random() < 0.5 else {"value": round(hours, 2), "unit": "h"}
        began = t - timedelta(hours=hours + 0.5)
        data = {"start": began.isoformat(), "end": t.isoformat(), "duration": duration}
    elif measure == "resting-heart-rate":
        data = {"time": t.isoformat(), "bpm": rng.randint(45, 95)}
    elif measure == "hrv":
        data = {"time": t.isoformat(), "sdnn": round(rng.uniform(15, 120), 1)}
    elif measure == "app-engagement":
        data = {"start": start.isoformat(), "end": t.isoformat(), "active_minutes": rng.randint(0, 90)}
        if rng.random() < 0.7:
            data["sessions"] = rng.randint(1, 8)
        if rng.random() < 0.4:
            data["modules_completed"] = rng.randint(0, 2)
        if rng.random() < 0.3:
            data["messages_exchanged"] = rng.randint(0, 12)
    elif measure == "phq9":
        answers = _answers(rng, 9, 0, 3)
        answers["item3"] = rng.choice(["LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"])
        if rng.random() < 0.6:
            answers["difficulty"] = rng.choice(["LA6572-7", "LA6573-5", "LA6575-0", "LA6574-3"])
        data = {"authored": t.isoformat(), "answers": answers}
    elif measure == "gad7":
        answers = _answers(rng, 7, 0, 3)
        if rng.random() < 0.3:
            answers["item2"] = "LA18938-3"
        data = {"authored": t.isoformat(), "answers": answers}
    elif measure == "dwai":
        data = {"authored": t.isoformat(), "answers": _answers(rng, 6, 1, 5)}
    else:  # phq2, gad2
        data = {"authored": t.isoformat(), "answers": _answers(rng, 2, 0, 3)}
    return data


def make_records(count: int, seed: int) -> list[tuple[str, str, bytes]]:
    """(measure, record id, record JSON bytes as it arrives in a push)."""
    rng = random.Random(seed)
    measures = rng.choices(list(MIX), weights=list(MIX.values()), k=count)
    out = []
    for i, measure in enumerate(measures):
        record: dict[str, Any] = {"record_id": f"r-{i}", "app_user_id": f"u-{i % 50}", "measure": measure}
        record["data"] = make_record(measure, rng)
        out.append((measure, f"r-{i}", orjson.dumps(record)))
    return out


def _cpu(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.process_time()
    produced = fn()
    return time.process_time() - start, produced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench mapping", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model-sample", type=int, default=1000, help="records for the fhir.resources row")
    args = parser.parse_args(argv)

    catalog = load_catalog()
    records = make_records(args.records, args.seed)
    device = device_full_url(VENDOR)
    mappers: dict[str, Any] = dict(catalog._mappers)
    schemas = {m: mappers[m].schema for m in catalog.measures()}  # the floor reuses them
    latest = RECEIVED + catalog.future_tolerance

    def floor() -> int:
        out = 0
        with RECORD_CONTEXT({"latest": latest}):
            for measure, _, raw in records:
                loaded = schemas[measure].load(orjson.loads(raw)["data"])
                out += len(orjson.dumps(loaded, default=str))
        return out

    def mapping() -> int:
        resources = 0
        for measure, record_id, raw in records:
            record = orjson.loads(raw)
            ctx = MappingContext(VENDOR, record_id, "Patient/bench", device, RECEIVED)
            result = catalog.map(measure, record["data"], ctx)
            if not result.ok:
                raise SystemExit(f"bench record {record_id} rejected: {result.rejections}")
            for mapped in result.resources:
                orjson.dumps(mapped.resource)
                resources += 1
        return resources

    sample = records[: args.model_sample]

    def with_models() -> int:
        resources = 0
        for measure, record_id, raw in sample:
            record = orjson.loads(raw)
            ctx = MappingContext(VENDOR, record_id, "Patient/bench", device, RECEIVED)
            for mapped in catalog.map(measure, record["data"], ctx).resources:
                validate_resource(mapped.resource).model_dump_json()
                resources += 1
        return resources

    floor_rates, map_rates, model_rates = [], [], []
    resources = 0
    for _ in range(args.runs):
        seconds, _ = _cpu(floor)
        floor_rates.append(len(records) / seconds)
        seconds, resources = _cpu(mapping)
        map_rates.append(len(records) / seconds)
        seconds, _ = _cpu(with_models)
        model_rates.append(len(sample) / seconds)

    floor_rate = statistics.median(floor_rates)
    map_rate = statistics.median(map_rates)
    model_rate = statistics.median(model_rates)
    mix = Counter(m for m, _, _ in records)
    print(f"mapping: {len(records)} records, {resources} resources, median of {args.runs} runs, CPU time")
    print("mix: " + ", ".join(f"{m} {n}" for m, n in mix.most_common()))
    print()
    print(f"{'figure':58} {'records/s':>10} {'floor':>10} {'ratio':>6}")
    print(f"{'floor: marshmallow load + orjson, no FHIR':58} {floor_rate:10,.0f} {floor_rate:10,.0f}   1.00")
    print(
        f"{'catalog.map + orjson (validated, mapped, FHIR-valid)':58} {map_rate:10,.0f} {floor_rate:10,.0f}"
        f" {map_rate / floor_rate:6.2f}"
    )
    print(
        f"{'naive: + fhir.resources model per resource (sample)':58} {model_rate:10,.0f} {floor_rate:10,.0f}"
        f" {model_rate / floor_rate:6.2f}"
    )
    print()
    print(
        f"runs (records/s): floor {[round(r) for r in floor_rates]}; mapping {[round(r) for r in map_rates]}"
    )
    return 0
