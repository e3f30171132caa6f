"""The largest catalogue on the real stack: ``POST /v1/catalog`` of a catalogue at ``CATALOG_DOCUMENT_BYTES_MAX`` goes
through Kafka as the ledger's command and comes back as its event, which rating serves; a larger one (its body well
under the 1 MiB request limit, above a Kafka record as published) is refused up front with 413 problem+json naming the
limit, and the catalogue stays as it was. Before, rating validated it and then Kafka refused the command: HTTP 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import yaml
from billing_events.catalog import CATALOG_DOCUMENT_BYTES_MAX
from billing_events.topics import RECORD_BYTES_MAX

from tests.catalogue_sizes import padded
from tests.integration.conftest import Stack
from tests.support import ROOT, auth, wait_until

pytestmark = pytest.mark.integration


def _catalogue(stack: Stack) -> dict[str, Any]:
    answer = httpx.get(f"{stack.rating_url}/v1/catalog", headers=auth("viewer", "x"), timeout=30)
    return dict(answer.json()) if answer.status_code == 200 else {}


def _with_plans(stack: Stack, count: int) -> dict[str, Any] | None:
    catalogue = _catalogue(stack)
    return catalogue if len(catalogue.get("plans", ())) == count else None


def test_the_largest_catalogue_is_applied_through_kafka_and_a_larger_one_is_refused_up_front(stack: Stack) -> None:
    demo = yaml.safe_load((ROOT / "examples/demo-catalog.yaml").read_text())["catalog"]

    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{stack.rating_url}/v1/catalog", headers=auth("admin"), json=body, timeout=60)

    try:
        largest = padded(demo, CATALOG_DOCUMENT_BYTES_MAX)
        accepted = post(largest)
        assert accepted.status_code == 202, accepted.text
        # The ledger applied it and its event reached rating over billing.ledger.events.
        published = wait_until(lambda: _with_plans(stack, len(largest["plans"])), timeout=90,
                               what="the largest catalogue served by rating")
        version = published["version"]

        # Above a whole Kafka record as published (every default filled in), from a body of less than half of it.
        larger = padded(demo, RECORD_BYTES_MAX + 100_000)
        refused = post(larger)
        assert refused.status_code == 413, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["bytes_max"] == CATALOG_DOCUMENT_BYTES_MAX
        assert f"{CATALOG_DOCUMENT_BYTES_MAX:,} bytes" in refused.json()["detail"]
        assert _catalogue(stack)["version"] == version
    finally:
        # The other tests of the session share this stack: the demo catalogue back (it keeps every live plan's meter).
        assert post(demo).status_code == 202
        wait_until(lambda: _with_plans(stack, len(demo["plans"])), timeout=90, what="the demo catalogue back")
