"""Fixtures of the ledger's unit tests: ``app`` (a LedgerApplication on SQLite in a temporary directory) and
``client`` (its HTTP routes behind the shared runtime's app)."""

from tests.unit.ledger.ledger_support import app, client  # noqa: F401
