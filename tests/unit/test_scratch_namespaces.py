"""Test runs clean up after themselves: every scratch namespace is one the next lone session may prune, and
nothing else (the services' own topics and schemas, bench namespaces, tenants) ever is."""

from __future__ import annotations

import pytest

from tests.namespaces import KINDS, TEST_NAMESPACE, is_local, namespace_of, scratch_namespace


@pytest.mark.parametrize("kind", KINDS)
def test_every_scratch_namespace_is_prunable(kind: str) -> None:
    namespace = scratch_namespace(kind)
    assert TEST_NAMESPACE.fullmatch(namespace_of(f"{namespace}.billing.usage.raw"))
    assert TEST_NAMESPACE.fullmatch(namespace_of(f"{namespace}_billing_ledger"))


@pytest.mark.parametrize("name", [
    "billing.usage.raw", "billing_ledger", "public", "__consumer_offsets", "bench3906e241.billing.usage.raw",
    "bench_cycle_1a2b3c4d", "acme-1a2b3c4d", "t1a2b3c.billing.usage.raw", "tx1a2b3c4d5e.billing.payments",
])
def test_names_that_are_not_test_namespaces_are_never_pruned(name: str) -> None:
    assert TEST_NAMESPACE.fullmatch(namespace_of(name)) is None


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown namespace kind"):
        scratch_namespace("bench")


@pytest.mark.parametrize(("address", "local"), [
    ("127.0.0.1:9092", True), ("localhost:9092", True), ("kafka.internal:9092", False),
    ("postgresql://billing:billing@127.0.0.1:55432/billing", True),
    ("postgresql://u:p@db.example.com:5432/billing", False),
])
def test_only_the_local_stack_is_pruned(address: str, local: bool) -> None:
    assert is_local(address) is local
