"""Property tests: random JSON and random field values thrown at ``IngestService.process`` (what the Kafka
consumer calls) and at ``POST /v1/usage`` (FastAPI TestClient). Every input ends accepted, duplicate or
rejected with a reason; nothing raises; every rejection is a dead letter on ``billing.usage.rejected`` and
never an accepted record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from billing_events import topics
from billing_events.messages import RejectReason
from billing_runtime.auth import mint_token
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.ingest.harness import TENANT, Ingest

REASONS = {r.value for r in RejectReason}
STATUSES = {"accepted", "duplicate", "rejected"}

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)

ids = st.one_of(st.text(max_size=12), st.integers(), st.none(), st.just(""), st.just("x" * 200),
                st.just("\ud800"))  # a lone surrogate: valid JSON (escaped), never valid UTF-8
tenants = st.one_of(st.sampled_from([TENANT, "globex", "", "bad tenant!"]), st.text(max_size=8), st.integers())
meters = st.one_of(st.sampled_from(["api_calls", "ai_tokens", "unknown_meter", "Bad"]), st.text(max_size=8))
quantities = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, places=6).map(str),
    st.integers(min_value=-10**20, max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: Decimal(repr(f))),  # a JSON number token
    st.sampled_from(["NaN", "Infinity", "-1", "1e400", "0.1", "", " 5 ", "1_000", "0x10"]),
    st.text(max_size=8), st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
)


def _timestamp(offset: timedelta, form: str) -> str:
    moment = datetime.now(UTC) + offset
    if form == "naive":
        return moment.replace(tzinfo=None).isoformat()
    if form == "offset":
        return moment.astimezone(UTC).isoformat().replace("+00:00", "+05:30")
    return moment.isoformat()


timestamps = st.one_of(
    st.builds(_timestamp, st.timedeltas(min_value=timedelta(days=-40), max_value=timedelta(hours=1)),
              st.sampled_from(["utc", "utc", "naive", "offset"])),
    st.text(max_size=12), st.integers(), st.none(),
)
properties = st.one_of(
    st.dictionaries(st.sampled_from(["model", "operation", "user", "", "x" * 70]),
                    st.one_of(st.text(max_size=10), st.integers(), st.booleans(), st.none(), st.just("v" * 300)),
                    max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), min_size=33, max_size=34),
    json_values,
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """An event-shaped object whose every field may be right or wrong."""
    fields = {"id": ids, "tenant": tenants, "meter": meters, "quantity": quantities, "timestamp": timestamps,
              "properties": properties, "correction_of": st.one_of(st.none(), st.text(max_size=5)),
              "extra": json_values}
    required = {"id", "tenant", "meter", "quantity", "timestamp"}
    event: dict[str, Any] = {}
    for name, strategy in fields.items():
        present = draw(st.booleans()) if name not in required else draw(st.integers(0, 9)) > 0
        if name == "extra":
            present = draw(st.integers(0, 9)) == 0
        if present:
            event[name] = draw(strategy)
    return event


@st.composite
def near_valid_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event with zero, one or two fields replaced by random values (so acceptance is common)."""
    event: dict[str, Any] = {
        "id": draw(st.text(min_size=1, max_size=10)), "tenant": TENANT,
        "meter": draw(st.sampled_from(["api_calls", "ai_tokens"])),
        "quantity": str(draw(st.decimals(min_value=0, max_value=10**6, places=4))),
        "timestamp": _timestamp(draw(st.timedeltas(min_value=timedelta(days=-30), max_value=timedelta(0))), "utc"),
        "properties": {"model": "m", "operation": "chat"},
    }
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from(sorted(event)))
        event[field] = draw(json_values | quantities | timestamps)
    hypothesis.event("near-valid")
    return event


def encode(value: Any) -> bytes:
    return json.dumps(value, default=str).encode()


raw_payloads = st.one_of(
    near_valid_events().map(encode),
    events().map(encode),
    json_values.map(encode),
    st.binary(max_size=64),
    st.just(b"x" * 20_000),
    st.just(b'{"id": "e", "tenant": "acme", "quantity": NaN}'),
    st.just(b"[" * 5000 + b"]" * 5000),  # deeper than the JSON decoder's recursion limit
)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Ingest]]:
    ingest = Ingest(Path(tmp_path_factory.mktemp("ingest-properties")))
    with TestClient(ingest.app, raise_server_exceptions=True) as client:
        client.portal.call(ingest.start)  # everything async lives on the TestClient's event loop
        yield client, ingest
        client.portal.call(ingest.stop)


def counts(client: TestClient, ingest: Ingest) -> tuple[int, int]:
    accepted = client.portal.call(ingest.published, topics.USAGE_ACCEPTED)
    rejected = client.portal.call(ingest.published, topics.USAGE_REJECTED)
    return len(accepted), len(rejected)


def new_messages(client: TestClient, ingest: Ingest, topic: str, before: int) -> list[dict[str, Any]]:
    return client.portal.call(ingest.published, topic)[before:]


def check_outcomes(outcomes: list[dict[str, Any]], sent: int, client: TestClient, ingest: Ingest,
                   before: tuple[int, int]) -> None:
    assert len(outcomes) == sent
    for outcome in outcomes:
        assert outcome["status"] in STATUSES
        if outcome["status"] == "rejected":
            assert outcome["reason"] in REASONS and outcome["detail"]
    accepted = new_messages(client, ingest, topics.USAGE_ACCEPTED, before[0])
    letters = new_messages(client, ingest, topics.USAGE_REJECTED, before[1])
    rejected = [o for o in outcomes if o["status"] == "rejected"]
    assert [d["reason"] for d in letters] == [o["reason"] for o in rejected]
    assert all(isinstance(d["payload"], str) for d in letters)
    assert sorted(a["event"]["id"] for a in accepted) == sorted(
        o["id"] for o in outcomes if o["status"] == "accepted")
    # Exactly the accepted inputs (by position, from the record's source) have an accepted record: a
    # rejected or duplicate input never does, so it can never move a balance.
    assert sorted(int(a["source"].rsplit(":", 1)[1]) for a in accepted) == [
        i for i, o in enumerate(outcomes) if o["status"] == "accepted"]
    assert sorted(int(d["source"].rsplit(":", 1)[1]) for d in letters) == [
        i for i, o in enumerate(outcomes) if o["status"] == "rejected"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(batch=st.lists(raw_payloads, min_size=1, max_size=8))
def test_the_consumer_path_never_raises_and_accounts_for_every_record(
        running: tuple[TestClient, Ingest], batch: list[bytes]) -> None:
    client, ingest = running
    before = counts(client, ingest)
    items = [(payload, f"kafka:test:0:{i}") for i, payload in enumerate(batch)]
    outcomes = client.portal.call(ingest.service.process, items)
    for outcome in outcomes:
        hypothesis.event(f"outcome: {outcome.status}")
    check_outcomes([o.as_dict() for o in outcomes], len(batch), client, ingest, before)


bodies = st.one_of(
    st.lists(near_valid_events() | events(), min_size=1, max_size=6).map(encode),
    st.builds(lambda evs: {"events": evs}, st.lists(st.one_of(events(), json_values), min_size=1, max_size=6))
    .map(encode),
    events().map(encode),
    json_values.map(encode),
    st.binary(max_size=40),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=bodies)
def test_the_http_route_answers_every_body_without_a_server_error(
        running: tuple[TestClient, Ingest], body: bytes) -> None:
    client, ingest = running
    token = mint_token(ingest.settings, role="service")
    before = counts(client, ingest)
    response = client.post("/v1/usage", content=body, headers={"Authorization": f"Bearer {token}",
                                                                 "Content-Type": "application/json"})
    assert response.status_code in (200, 400, 413, 422), response.text
    if response.status_code != 200:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert counts(client, ingest) == before  # a refused body changes nothing
        return
    answer = response.json()
    check_outcomes(answer["results"], len(answer["results"]), client, ingest, before)
    assert answer["accepted"] + answer["duplicates"] + answer["rejected"] == len(answer["results"])


def test_a_valid_event_among_random_ones_is_accepted_exactly_once(running: tuple[TestClient, Ingest]) -> None:
    client, ingest = running
    good = {"id": "property-good-1", "tenant": TENANT, "meter": "api_calls", "quantity": "1.5",
            "timestamp": datetime.now(UTC).isoformat()}
    token = mint_token(ingest.settings, role="service")
    first = client.post("/v1/usage", json=[good, good], headers={"Authorization": f"Bearer {token}"})
    assert [r["status"] for r in first.json()["results"]] == ["accepted", "duplicate"]
    outcomes = client.portal.call(ingest.service.process, [(encode(good), "kafka:test:0:0")])
    assert [o.status for o in outcomes] == ["duplicate"]
