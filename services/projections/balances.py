"""Read model: balances per wallet and per grant, the chart of accounts per tenant, and account facts.

* ``accounts``: one row per billing account (the tenant of every later event of that aggregate).
* ``wallets``: per tenant and unit: ``balance`` (sum of wallet postings, credit-negative turned positive),
  ``held`` (active holds), ``receivable`` (overage owed), low-balance threshold and last alert, freshness.
  ``available = balance - held - late_usage_reserve``, the reserve summed from ``grants`` when read
  (``RESERVE_SQL``): the ``remaining`` of the open grants set aside.
* ``grants``: one row per grant with its ``remaining`` credit (minus its wallet postings), status, expiry, and
  ``drawable_until`` (a plan credit: usage from then on no longer draws it, though it stays open until
  ``expires_at``: a rollover credit until its renewal carries it, one without for its period's late usage;
  ``CreditGranted.drawable_until``, recorded since session 9 for rollover credits, since session 13 for all). "Expiring
  soon" looks at the earlier of the two (``ends_at``). ``set_aside_at``: when its period ended and the ledger set
  it aside for that period's late usage (``GrantSetAside``, since session 13): what is left of it is the wallet's
  ``late_usage_reserve``, in ``balance`` but not ``available`` (new usage cannot draw it). ``carry_drawn``: what late
  usage of the period before drew of it through a carry into it (draws naming ``carry_of``, net of give-backs, since
  session 15): the API shows ``amount`` less it, what the grant gave its own period.
* ``ledger_balances``: signed balance (debit positive) per tenant, ledger account and unit.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from billing_projections.facts import RECEIVABLES, Fact, PostingSums, json_text, posting_sums, utc_text
from billing_projections.limits import EXPIRING_SOON_SECONDS
from billing_projections.writer import INT_SUM, BatchWriter, Handler, Table, value
from billing_runtime.db import Database

ACCOUNTS = Table("accounts", {"account_id": "TEXT"}, {
    "tenant": value("TEXT NOT NULL UNIQUE"), "currency": value("TEXT NOT NULL"),
    "opened_at": value("TEXT NOT NULL"), "opened_by": value("TEXT"), "last_position": value("BIGINT NOT NULL"),
})
WALLETS = Table("wallets", {"tenant": "TEXT", "unit": "TEXT"}, {
    "balance": INT_SUM, "held": INT_SUM, "receivable": INT_SUM,
    "low_balance_threshold": value("BIGINT"), "low_balance_reached_at": value("TEXT"),
    "low_balance_alerts": INT_SUM, "updated_at": value("TEXT"), "last_position": value("BIGINT"),
})
GRANTS = Table("grants", {"grant_id": "TEXT"}, {
    "tenant": value("TEXT NOT NULL"), "unit": value("TEXT NOT NULL"), "source": value("TEXT NOT NULL"),
    "amount": value("BIGINT NOT NULL"), "tax_amount": value("BIGINT NOT NULL"), "remaining": INT_SUM,
    "refunded": INT_SUM, "breakage": INT_SUM, "carry_drawn": INT_SUM, "priority": value("BIGINT NOT NULL"),
    "effective_at": value("TEXT NOT NULL"), "expires_at": value("TEXT"), "drawable_until": value("TEXT"),
    "set_aside_at": value("TEXT"), "scope": value("TEXT"),
    "status": value("TEXT NOT NULL"), "granted_by": value("TEXT"), "cause": value("TEXT"),
    "last_position": value("BIGINT"),
}, indexes=("tenant, expires_at",))
LEDGER_BALANCES = Table("ledger_balances", {"tenant": "TEXT", "ledger_account": "TEXT", "unit": "TEXT"}, {
    "amount": INT_SUM, "last_position": value("BIGINT NOT NULL"),
})
TABLES = (ACCOUNTS, WALLETS, GRANTS, LEDGER_BALANCES)

# Holds carry no postings (an authorisation is not a movement): the field whose amount leaves or joins ``held``.
HOLD_DELTAS = {
    "HoldPlaced": (1, "amount"),
    "HoldCaptured": (-1, "held_amount"),
    "HoldReleased": (-1, "amount"),
    "HoldExpired": (-1, "amount"),
}


def handler_for(event_type: str) -> Handler | None:
    """Every account event may move a wallet, a grant or a ledger account (usage debits, the bulk of the
    stream, take a shorter path to the same rows)."""
    if event_type == "BillingAccount.UsageDebited":
        return _project_debit
    return project if event_type.startswith("BillingAccount.") else None


def _project_debit(fact: Fact, w: BatchWriter) -> None:
    """``project`` for a ``UsageDebited``: no hold, no threshold, no grant status; the same upserts."""
    # A usage debit takes debits.project, which writes what this does in one pass with the other read models:
    # a change here goes there too (tests/unit/projections/test_debits.py compares the two).
    tenant = fact.tenant
    if not tenant:
        return
    data, position = fact.data, fact.position
    sums = posting_sums(fact)
    last = {"last_position": position}
    wallet_add: dict[str, dict[str, int] | None] = {}
    accounts = sums.accounts
    for key in sorted(accounts) if len(accounts) > 1 else accounts:
        amount = accounts[key]
        w.upsert(LEDGER_BALANCES, (tenant, key[0], key[1]), add={"amount": amount}, set=last)
        if key[0] == RECEIVABLES:
            wallet_add.setdefault(key[1], {})["receivable"] = amount  # type: ignore[index]
    for unit, delta in sums.wallet.items():
        wallet_add.setdefault(unit, {})["balance"] = delta  # type: ignore[index]
    unit = data.get("unit")
    if isinstance(unit, str) and unit not in wallet_add:
        wallet_add[unit] = None
    fresh = {"updated_at": fact.recorded_at, "last_position": position}
    for one in sorted(wallet_add) if len(wallet_add) > 1 else wallet_add:
        w.upsert(WALLETS, (tenant, one), set=fresh, add=wallet_add[one])
    credit = data.get("credit_grant")
    if isinstance(credit, dict):
        _insert_grant(fact, w, credit, granted_at=fact.occurred_at)
    grants = sums.grants
    carried = carry_drawn(data)
    for grant_id in sorted(grants) if len(grants) > 1 else grants:
        add = {"remaining": grants[grant_id]}
        if grant_id in carried:
            add["carry_drawn"] = carried[grant_id]
        w.upsert(GRANTS, (grant_id,), set=last, add=add)


def carry_drawn(data: dict[str, Any]) -> dict[str, int]:
    """Per grant, what a debit's or capture's draws took of it through a carry into it (``carry_of``: late usage of
    the period before; negative: a give-back of such usage). Empty for almost every debit."""
    found: dict[str, int] = {}
    draws = data.get("draws")
    for draw in draws if isinstance(draws, list) else ():
        if isinstance(draw, dict) and draw.get("carry_of"):
            gid = str(draw["grant_id"])
            found[gid] = found.get(gid, 0) + int(draw["amount"])
    return found


def project(fact: Fact, w: BatchWriter) -> None:
    if fact.aggregate != "BillingAccount" or not fact.tenant:
        return
    data, tenant, name, position = fact.data, fact.tenant, fact.name, fact.position
    fresh = {"updated_at": fact.recorded_at, "last_position": position}
    if name == "Opened":
        w.insert(ACCOUNTS, (fact.aggregate_id,), {
            "tenant": tenant, "currency": data["currency"], "opened_at": fact.recorded_at,
            "opened_by": data.get("opened_by"), "last_position": position})
        w.upsert(WALLETS, (tenant, data["currency"]),
                 set={"low_balance_threshold": data.get("low_balance_threshold"), **fresh})
        return
    sums = posting_sums(fact)
    wallet_add: dict[str, dict[str, int]] = {}
    if sums.accounts:
        last = {"last_position": position}
        for (ledger_account, unit), amount in sorted(sums.accounts.items()):
            w.upsert(LEDGER_BALANCES, (tenant, ledger_account, unit), add={"amount": amount}, set=last)
            if ledger_account == RECEIVABLES:
                wallet_add.setdefault(unit, {})["receivable"] = amount
        for unit, delta in sums.wallet.items():
            wallet_add.setdefault(unit, {})["balance"] = delta
    hold = HOLD_DELTAS.get(name)
    if hold is not None:
        wallet_add.setdefault(data["unit"], {})["held"] = hold[0] * int(data[hold[1]])
    wallet_set: dict[str, dict[str, Any]] = {}
    if name == "LowBalanceThresholdSet":
        wallet_set[data["unit"]] = {"low_balance_threshold": data.get("threshold")}
    elif name == "LowBalanceReached":
        wallet_set[data["unit"]] = {"low_balance_reached_at": fact.occurred_at}
        wallet_add.setdefault(data["unit"], {})["low_balance_alerts"] = 1
    unit = data.get("unit")
    if not wallet_set and len(wallet_add) <= 1 and (not wallet_add or unit in wallet_add or
                                                   not isinstance(unit, str)):
        # The common case: one unit (the event's own), nothing set but freshness.
        if wallet_add:
            [(only, add)] = wallet_add.items()
            w.upsert(WALLETS, (tenant, only), set=fresh, add=add)
        elif isinstance(unit, str):
            w.upsert(WALLETS, (tenant, unit), set=fresh)
    else:
        units = set(wallet_add) | set(wallet_set)
        if isinstance(unit, str):
            units.add(unit)
        for one in sorted(units):
            w.upsert(WALLETS, (tenant, one), set={**wallet_set.get(one, {}), **fresh}, add=wallet_add.get(one))
    _project_grants(fact, w, sums)


def _project_grants(fact: Fact, w: BatchWriter, sums: PostingSums) -> None:
    data, name = fact.data, fact.name
    if name == "CreditGranted":
        _insert_grant(fact, w, data, granted_at=data.get("effective_at") or fact.recorded_at)
    elif name == "UsageDebited" and isinstance(data.get("credit_grant"), dict):
        _insert_grant(fact, w, data["credit_grant"], granted_at=fact.occurred_at)
    elif name == "BalanceAdjusted" and isinstance(data.get("grant"), dict):
        _insert_grant(fact, w, data["grant"], granted_at=fact.occurred_at)
    grant_id = str(data.get("grant_id") or "")
    if name not in _GRANT_EVENTS:
        last = {"last_position": fact.position}
        carried = carry_drawn(data) if name == "HoldCaptured" else {}
        for gid, delta in sorted(sums.grants.items()):
            w.upsert(GRANTS, (gid,), set=last,
                     add={"remaining": delta, **({"carry_drawn": carried[gid]} if gid in carried else {})})
        return
    changes: dict[str, dict[str, dict[str, Any]]] = {}
    for gid, delta in sums.grants.items():
        changes.setdefault(gid, {"set": {}, "add": {}})["add"]["remaining"] = delta
    if name == "GrantExpired":
        change = changes.setdefault(grant_id, {"set": {}, "add": {}})
        change["set"]["status"] = "expired"
        change["add"]["breakage"] = int(data.get("remainder") or 0)
    elif name == "GrantVoided":
        change = changes.setdefault(grant_id, {"set": {}, "add": {}})
        change["set"]["status"] = "voided"
        if data.get("lapsed"):  # the part that lapsed instead of going back (recorded since session 9)
            change["add"]["breakage"] = int(data["lapsed"])
    elif name == "GrantRefunded":
        changes.setdefault(grant_id, {"set": {}, "add": {}})["add"]["refunded"] = int(data["amount"])
    elif name == "GrantSetAside":  # no postings: its remaining leaves the wallet's available for its reserve
        changes.setdefault(grant_id, {"set": {}, "add": {}})["set"]["set_aside_at"] = fact.occurred_at
    elif name == "GrantKeptForLateUsage":  # since session 14: cut or ended, open for late usage until its new expiry
        change = changes.setdefault(grant_id, {"set": {}, "add": {}})
        change["set"]["drawable_until"] = utc_text(data["drawable_until"])
        change["set"]["expires_at"] = utc_text(data["expires_at"])
        if data.get("lapsed"):  # what of what it moved out lapsed (a change after its fee was given back in full)
            change["add"]["breakage"] = int(data["lapsed"])
    for gid in sorted(changes):
        w.upsert(GRANTS, (gid,), set={**changes[gid]["set"], "last_position": fact.position},
                 add=changes[gid]["add"])


_GRANT_EVENTS = frozenset({"GrantExpired", "GrantVoided", "GrantRefunded", "GrantSetAside", "GrantKeptForLateUsage"})


def _insert_grant(fact: Fact, w: BatchWriter, grant: dict[str, Any], *, granted_at: str) -> None:
    expires, drawable = grant.get("expires_at"), grant.get("drawable_until")
    w.insert(GRANTS, (str(grant["grant_id"]),), {
        "tenant": fact.tenant, "unit": grant["unit"], "source": grant.get("source") or "manual",
        "amount": int(grant["amount"]), "tax_amount": int(grant.get("tax_amount") or 0),
        "priority": int(grant.get("priority") or 0),
        "effective_at": utc_text(grant.get("effective_at") or granted_at),
        "expires_at": utc_text(expires) if expires else None,
        "drawable_until": utc_text(drawable) if drawable else None,
        "scope": json_text(grant["scope"]) if grant.get("scope") else None,
        "status": "open", "granted_by": grant.get("granted_by") or fact.data.get("user"),
        "cause": json_text(grant.get("cause") or {}),
        "last_position": fact.position,
    })


# -- queries ---------------------------------------------------------------------------------------------


async def account(db: Database, tenant: str) -> dict[str, Any] | None:
    return await db.fetchrow("SELECT account_id, tenant, currency, opened_at, opened_by, last_position "
                             "FROM accounts WHERE tenant = $1", tenant)


async def accounts(db: Database) -> list[dict[str, Any]]:
    return await db.fetch("SELECT tenant, currency, opened_at FROM accounts ORDER BY tenant")


async def wallets(db: Database, tenant: str | None = None) -> list[dict[str, Any]]:
    sql = ("SELECT tenant, unit, balance, held, receivable, low_balance_threshold, low_balance_reached_at, "
           "low_balance_alerts, updated_at, last_position FROM wallets")
    if tenant is None:
        return await db.fetch(sql + " ORDER BY tenant, unit")
    return await db.fetch(sql + " WHERE tenant = $1 ORDER BY unit", tenant)


GRANT_STATUSES = ("open", "expired", "voided")  # a grant's status: open until it expires or is voided


async def grants(db: Database, tenant: str, *, status: str | None = None, unit: str | None = None
                 ) -> list[dict[str, Any]]:
    where, args = ["tenant = $1"], [tenant]
    for column, wanted in (("status", status), ("unit", unit)):
        if wanted:
            args.append(wanted)
            where.append(f"{column} = ${len(args)}")
    return await db.fetch(
        "SELECT grant_id, unit, source, amount, tax_amount, remaining, refunded, breakage, carry_drawn, priority, "
        "effective_at, expires_at, drawable_until, set_aside_at, scope, status, granted_by, cause, last_position "
        "FROM grants "
        f"WHERE {' AND '.join(where)} "
        "ORDER BY effective_at, grant_id", *args)


async def expiring(db: Database, now: datetime, tenant: str | None = None) -> dict[tuple[str, str], int]:
    """Remaining credit per (tenant, unit) of open grants whose credit stops being drawable (``ENDS_AT_SQL``)
    within ``EXPIRING_SOON_SECONDS``."""
    start, end = expiring_window(now)
    args: list[Any] = [start, end]
    where = ""
    if tenant is not None:
        args.append(tenant)
        where = " AND tenant = $3"
    rows = await db.fetch(
        "SELECT tenant, unit, SUM(remaining) AS remaining FROM grants WHERE status = 'open' AND "
        f"{ENDS_AT_SQL} > $1 AND {ENDS_AT_SQL} <= $2 AND remaining > 0{where} GROUP BY tenant, unit", *args)
    return {(r["tenant"], r["unit"]): int(r["remaining"]) for r in rows}


async def late_usage_reserves(db: Database, tenant: str | None = None) -> dict[tuple[str, str], int]:
    """Per (tenant, unit): the credit set aside for ended periods' late usage (``RESERVE_SQL``)."""
    where, args = "", []
    if tenant is not None:
        where, args = " AND tenant = $1", [tenant]
    rows = await db.fetch(f"SELECT tenant, unit, SUM(remaining) AS remaining FROM grants WHERE {RESERVE_SQL}{where} "
                          "GROUP BY tenant, unit", *args)
    return {(r["tenant"], r["unit"]): int(r["remaining"]) for r in rows}


# The grants whose remaining credit is a wallet's ``late_usage_reserve``: open and set aside at their period's end
# (their remaining is 0 once expired or voided, but the status keeps the sum to open grants, as the ledger's).
RESERVE_SQL = "status = 'open' AND set_aside_at IS NOT NULL"


# When a grant's credit stops being drawable: ``drawable_until`` if it has one (the ledger refuses one after
# ``expires_at``), else ``expires_at``; NULL: never. Stored UTC texts compare in time order.
ENDS_AT_SQL = "COALESCE(drawable_until, expires_at)"


def ends_at(grant: dict[str, Any]) -> str | None:
    """``ENDS_AT_SQL`` of a grant row: the earlier of ``drawable_until`` and ``expires_at`` (None: never)."""
    ends = [t for t in (grant.get("drawable_until"), grant.get("expires_at")) if t]
    return min(ends) if ends else None


def expiring_window(now: datetime) -> tuple[str, str]:
    """(after, until]: expiry times that count as "expiring soon" at ``now`` (stored time texts)."""
    return utc_text(now), utc_text(now + timedelta(seconds=EXPIRING_SOON_SECONDS))


def expiring_soon(grant_rows: list[dict[str, Any]], now: datetime) -> dict[str, int]:
    """Remaining credit per unit of open grants whose credit stops being drawable (``ends_at``: the earlier of
    ``drawable_until`` and ``expires_at``) within ``EXPIRING_SOON_SECONDS`` of ``now``."""
    start, end = utc_text(now), utc_text(now + timedelta(seconds=EXPIRING_SOON_SECONDS))
    found: dict[str, int] = {}
    for g in grant_rows:
        ends = ends_at(g)
        if g["status"] == "open" and ends and start < ends <= end and g["remaining"] > 0:
            found[g["unit"]] = found.get(g["unit"], 0) + int(g["remaining"])
    return found


async def ledger_balances(db: Database, tenant: str | None = None) -> list[dict[str, Any]]:
    if tenant is None:
        return await db.fetch("SELECT ledger_account, unit, SUM(amount) AS amount FROM ledger_balances "
                              "GROUP BY ledger_account, unit ORDER BY ledger_account, unit")
    return await db.fetch("SELECT ledger_account, unit, amount FROM ledger_balances WHERE tenant = $1 "
                          "ORDER BY ledger_account, unit", tenant)
