"""The catalogue aggregate: immutable versions, plan versioning (grandfathering), idempotent publish."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.catalog import Catalog, InvalidCatalog
from eventsourcing.application import Application

from tests.unit.ledger.ledger_support import apply, command

DOC: dict[str, Any] = {
    "meters": [{"code": "api_calls"}],
    "plans": [{"code": "pro", "name": "Pro", "currency": "USD", "base_fee": "49.00",
               "charges": [{"meter": "api_calls", "included": "1000",
                            "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}]}],
    "packages": [{"code": "p100", "name": "100 credits", "unit": "USD", "credits": "100", "bonus_credits": "10",
                  "price": "100", "currency": "USD"}],
}


def test_same_content_twice_is_one_version() -> None:
    catalog = Catalog()
    assert catalog.publish(document=DOC, digest="d1", published_by="admin") is True
    assert catalog.publish(document=DOC, digest="d1", published_by="admin") is False
    assert catalog.catalog_version == 1


def test_a_changed_plan_gets_the_next_version_and_the_old_one_stays() -> None:
    catalog = Catalog()
    catalog.publish(document=DOC, digest="d1", published_by="admin")
    unrelated = copy.deepcopy(DOC)
    unrelated["meters"].append({"code": "storage_gb"})
    catalog.publish(document=unrelated, digest="d2", published_by="admin")
    assert catalog.document["plans"][0]["version"] == 1  # unchanged plan keeps its version
    repriced = copy.deepcopy(unrelated)
    repriced["plans"][0]["base_fee"] = "59.00"
    catalog.publish(document=repriced, digest="d3", published_by="admin")
    assert catalog.document["plans"][0]["version"] == 2
    assert catalog.plan("pro", 1)["base_fee"] == "49.00"  # grandfathered subscriptions read this
    assert catalog.plan("pro", 2)["base_fee"] == "59.00"
    app = Application[Any]()
    app.save(catalog)
    replayed = app.repository.get(catalog.id)
    assert replayed.plan("pro", 1) == catalog.plan("pro", 1) and replayed.catalog_version == 3


def test_packages_show_effective_credits_and_cost_per_credit() -> None:
    catalog = Catalog()
    catalog.publish(document=DOC, digest="d1", published_by="admin")
    package = catalog.document["packages"][0]
    assert (package["effective_credits"], package["cost_per_credit"]) == ("110", "0.909091")


def test_an_invalid_catalogue_is_refused_without_an_event() -> None:
    catalog = Catalog()
    bad = copy.deepcopy(DOC)
    bad["plans"][0]["charges"][0]["meter"] = "nope"
    with pytest.raises(InvalidCatalog, match="unknown meter"):
        catalog.publish(document=bad, digest="x", published_by="admin")
    assert catalog.catalog_version == 0 and len(catalog.collect_events()) == 1  # only Created


@pytest.mark.parametrize("document", [{}, {"tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}]},
                                      {"meters": [], "plans": [], "packages": []}])
def test_an_empty_catalogue_is_refused_and_the_published_one_stays(document: dict[str, Any]) -> None:
    # A version replaces the whole catalogue: an empty one published by a raw catalog.publish command used to become
    # the current version (every meter, plan and package gone; all later usage refused as unknown meters).
    catalog = Catalog()
    catalog.publish(document=DOC, digest="d1", published_by="admin")
    catalog.collect_events()
    with pytest.raises(InvalidCatalog, match="no meters, plans or packages"):
        catalog.publish(document=document, digest="empty", published_by="kafka")
    assert catalog.catalog_version == 1 and catalog.document["meters"][0]["code"] == "api_calls"
    assert catalog.collect_events() == []


def test_the_catalog_publish_command_of_an_empty_catalogue_is_rejected_with_its_reason(tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    try:
        [published] = apply(app, command("catalog.publish", None, {"document": DOC, "digest": "d1"}))
        assert published.outcome == "applied"
        [refused] = apply(app, command("catalog.publish", None, {"document": {}, "digest": "empty"}))
        assert (refused.outcome, refused.reason) == ("rejected", "invalid_catalog")
        assert "no meters, plans or packages" in refused.detail
        catalog = app.repository.get(Catalog.create_id())
        assert catalog.catalog_version == 1 and [m["code"] for m in catalog.document["meters"]] == ["api_calls"]
    finally:
        app.close()
