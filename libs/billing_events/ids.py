"""Deterministic identifiers (uuid5 of natural keys), so a retry produces the same id and is refused."""

from __future__ import annotations

from functools import lru_cache
from uuid import NAMESPACE_URL, UUID, uuid5

ACCOUNT_ID_CACHE_MAX = 65536


def _id(path: str) -> UUID:
    return uuid5(NAMESPACE_URL, path)


@lru_cache(maxsize=ACCOUNT_ID_CACHE_MAX)
def account_id(tenant: str) -> UUID:
    """The billing account (one per tenant/organisation)."""
    return _id(f"/accounts/{tenant}")


def usage_command_id(tenant: str, event_id: str) -> UUID:
    """The ledger command that posts one usage event: a second delivery carries the same id."""
    return _id(f"/usage/{tenant}/{event_id}")


def grant_id(tenant: str, key: str) -> UUID:
    return _id(f"/grants/{tenant}/{key}")


def command_id(kind: str, *parts: str) -> UUID:
    """A command id derived from its cause, e.g. ``command_id("catalog.publish", digest)``."""
    return _id("/commands/" + kind + "/" + "/".join(parts))


def catalog_id() -> UUID:
    return _id("/catalog")
