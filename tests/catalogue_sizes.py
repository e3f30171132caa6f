"""Catalogues of a chosen size for the tests of ``CATALOG_DOCUMENT_BYTES_MAX``: the worst case for the ledger's
``Catalog.Published`` event, many small plans with the longest codes (each new plan version is named again by code in
the event), padding a real catalogue up to the size asked for."""

from __future__ import annotations

import copy
from typing import Any

from billing_events.catalog import published_bytes
from billing_rating.catalog_view import validate_document

CODE_BYTES = 64  # the longest plan code (``billing_events.catalog.CODE``)


def padded(catalogue: dict[str, Any], size: int) -> dict[str, Any]:
    """``catalogue`` with as many minimal plans added as keep it at most ``size`` bytes as published (within one
    plan of it: ``size`` less at most one plan's bytes)."""
    def plan(n: int) -> dict[str, Any]:
        return {"code": f"p{n:0{CODE_BYTES - 1}d}", "name": "", "currency": "USD", "base_fee": "0"}

    def published(plans: int) -> int:
        document = copy.deepcopy(catalogue)
        document["plans"] = list(document.get("plans", [])) + [plan(n) for n in range(plans)]
        return published_bytes(validate_document(document).model_dump(mode="json"))

    base, one = published(0), published(1)
    each = published(2) - one  # every padding plan is the same size (codes of one length)
    count = max(0, (size - base) // each)
    while count and published(count) > size:
        count -= 1
    document = copy.deepcopy(catalogue)
    document["plans"] = list(document.get("plans", [])) + [plan(n) for n in range(count)]
    return document
