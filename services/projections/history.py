"""Read model: transaction history, one row per movement event, in ledger order (its position).

Every row says what happened (``type``), when (``occurred_at``: business time; ``recorded_at``), how much
(``amount``: the movement as the tenant sees it, signed; ``wallet_delta`` and ``held_delta``: its exact
effect on the wallet balance and on held credit, so the rows of a unit sum to ``balance`` and ``held``),
why (``cause``: usage event ids, payment id, reason) and who (``user_id``).

A credit package priced in a currency but granted in a credit unit shows twice: the credit (``purchase``, in
the credit unit, on the wallet) and the money paid for it (``payment``: the total with its tax, in the
currency, ``wallet_delta`` 0), and a refund of its credit as ``refund`` plus the money given back
(``payment_refund``, negative). A refund of credit bought in the currency is one ``refund`` row (the credit)
whose detail gives the tax paid back with it (``net N, tax N``, after ``finance override; `` if forced). So the
money rows of a currency sum to what the tenant paid for credit
packages net of refunds, and the wallet rows still sum to the balance.

A subscription invoice's fees and tax show as ``invoice_billed`` (negative: owed) when it is finalized and
``invoice_paid`` (positive) when it is paid, or ``invoice_voided`` if it is voided unpaid; ``reference`` is
the invoice id and ``wallet_delta`` 0. A subscription credit note is a ``grant`` (detail ``credit_note``).
The rounding of an invoice's usage lines posted with its overage is ``invoice_rounding`` (negative when the lines
rounded up: owed more; ``InvoicedOverageRounded``) and, when that invoice is voided unpaid, ``invoice_rounding_reversed``
(the opposite sign); ``reference`` is the invoice id, the detail names it too, ``wallet_delta`` 0. An invoice
finalized before session 13 whose total is finer than its currency is charged in (12.957 KWD) is paid what a gateway
can charge (12.950: ``invoice_paid``) and the rest written off first: ``invoice_charge_rounding`` (positive, no
longer owed; ``InvoiceChargeRounded``, detail ``written off; invoice <id>``), so the invoice's rows still net to 0.

A usage give-back (``usage``, positive, detail ``give-back``) whose part a finance-override refund already paid back
in money is *absorbed* (``UsageDebited.absorbed``, no postings): the detail says how much (``give-back; absorbed N``,
sub-units), and ``wallet_delta`` is only what was credited back.

A gateway refund of a grant whose usage a give-back had returned as ``usage_reversal`` credit (since session 11)
is one ``refund`` row of the whole amount paid back; it takes that credit back (``GrantRefunded.reclaimed``), so
its ``wallet_delta`` is only the credit taken, and its detail says so (``usage_reversal credit taken back N``, and
``owed N`` for what of it was spent: receivables).

A dispute (a chargeback, since session 13) shows as ``dispute`` rows: its opening (``DisputeRaised``, amount 0,
detail ``opened``), the funds the gateway withdrew and reinstated (``funds withdrawn N`` / ``funds reinstated N``,
amount and ``wallet_delta`` 0: the customer's credit does not move) and its close (``won``, ``closed``, ``lost``;
a lost dispute of an invoice's payment has the amount owed again, negative, and ``owed N``), each with the dispute
id as ``reference``; a lost dispute's chargeback is booked as a refund and its rows (``GrantRefunded``, and a
credit-unit package's money, ``PurchaseMoneyRefunded``) are ``dispute`` rows too, their detail starting with
``chargeback <dispute id>``. So the money rows of a currency sum to what was paid for packages net of refunds and
chargebacks. Since session 14 the gateway's fee for a dispute is a ``dispute`` row too (``DisputeFeeBooked``, amount
0: the operator's expense, not the customer's; detail ``fee charged N`` / ``fee given back N``, or ``fee N <unit> not
booked`` in another currency; a reading that changed nothing has no row), and a partial chargeback's share of an order's bonus a ``void`` row
(``GrantPartVoided``, detail ``chargeback <dispute id>; order_charged_back``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from billing_projections.facts import Fact, chargeback_of, first_text, json_text, posting_sums, text_list
from billing_projections.writer import BatchWriter, Handler, Table, value
from billing_runtime.db import Database

TRANSACTIONS = Table("transactions", {"position": "BIGINT"}, {
    "tenant": value("TEXT NOT NULL"), "occurred_at": value("TEXT NOT NULL"), "recorded_at": value("TEXT NOT NULL"),
    "type": value("TEXT NOT NULL"), "unit": value("TEXT NOT NULL"), "amount": value("BIGINT NOT NULL"),
    "wallet_delta": value("BIGINT NOT NULL"), "held_delta": value("BIGINT NOT NULL"), "meter": value("TEXT"),
    "quantity": value("TEXT"), "user_id": value("TEXT"), "grant_id": value("TEXT"), "hold_id": value("TEXT"),
    "event_ids": value("TEXT"), "payment_id": value("TEXT"), "reference": value("TEXT"), "detail": value("TEXT"),
    "cause": value("TEXT"),
}, indexes=("tenant, position", "occurred_at"), append_only=True)
TABLES = (TRANSACTIONS,)

TYPES = ("purchase", "grant", "usage", "usage_rejected", "expiry", "void", "refund", "adjustment", "hold_placed",
         "hold_captured", "hold_released", "hold_expired", "receivable_settled", "overage_repaid", "payment",
         "payment_refund", "invoice_billed", "invoice_paid", "invoice_voided", "invoice_refunded", "invoice_rounding",
         "invoice_rounding_reversed", "invoice_charge_rounding", "dispute")

# How the dashboard names each type (the API and CSV keep the keys above).
TYPE_LABELS = {
    "purchase": "Credit purchase", "grant": "Credit grant", "usage": "Usage", "usage_rejected": "Usage refused",
    "expiry": "Credit expired", "void": "Grant voided", "refund": "Refund", "adjustment": "Adjustment",
    "hold_placed": "Hold placed", "hold_captured": "Hold captured", "hold_released": "Hold released",
    "hold_expired": "Hold expired", "receivable_settled": "Overage settled", "overage_repaid": "Overage repaid",
    "payment": "Payment", "payment_refund": "Payment refunded", "invoice_billed": "Invoice billed",
    "invoice_paid": "Invoice paid", "invoice_voided": "Invoice voided", "invoice_refunded": "Invoice refunded",
    "invoice_rounding": "Invoice rounding", "invoice_rounding_reversed": "Invoice rounding reversed",
    "invoice_charge_rounding": "Invoice charge rounding written off", "dispute": "Dispute (chargeback)",
}


def type_label(type_: str) -> str:
    """The dashboard's name of a transaction type; an unknown key is shown as it is."""
    return TYPE_LABELS.get(type_, type_)


PAYMENT_KEYS = ("payment_id", "gateway_payment_id", "gateway_event_id", "order_id", "checkout_id", "payment")


def _movement(fact: Fact) -> dict[str, Any] | None:
    """type, amount (signed, the tenant's view), held_delta and the event's own references; None: not a movement."""
    d, name = fact.data, fact.name
    if name == "CreditGranted":
        return {"type": "purchase" if d.get("source") == "purchase" else "grant", "amount": int(d["amount"]),
                "grant_id": d.get("grant_id"), "user_id": d.get("granted_by"), "detail": d.get("source")}
    if name == "UsageDebited":
        if is_free_usage(d):
            return None
        return {"type": "usage", "amount": -int(d["amount"]), "reference": d.get("command_id"),
                "detail": give_back_detail(d) if int(d["amount"]) < 0 else reinstated_detail(d)}
    if name == "UsageRejected":
        return {"type": "usage_rejected", "amount": 0, "reference": d.get("command_id"), "detail": d.get("reason")}
    if name == "GrantExpired":
        return {"type": "expiry", "amount": -int(d.get("remainder") or 0), "grant_id": d.get("grant_id")}
    if name == "GrantVoided":
        return {"type": "void", "amount": -int(d.get("remainder") or 0), "grant_id": d.get("grant_id"),
                "user_id": d.get("voided_by"), "detail": d.get("reason")}
    if name == "GrantPartVoided":  # a partial chargeback's share of an order's bonus (since session 14)
        dispute = chargeback_of(d)
        return {"type": "void", "amount": -int(d["amount"]), "grant_id": d.get("grant_id"),
                "user_id": d.get("voided_by"),
                "detail": f"chargeback {dispute}; {d.get('reason')}" if dispute else d.get("reason")}
    if name == "GrantKeptForLateUsage":  # since session 14: what it moved into the next grant leaves it (a void row)
        if not int(d.get("moved") or 0):
            return None  # nothing moved: it stays in the wallet, set aside (no movement)
        return {"type": "void", "amount": -int(d["moved"]), "grant_id": d.get("grant_id"), "user_id": d.get("by"),
                "detail": f"{d.get('reason')}; kept for late usage until {d.get('expires_at')}"}
    if name == "GrantRefunded":
        # A purchase in the currency gives back its tax with the credit: the row says what was paid back.
        tax = int(d.get("tax_amount") or 0)
        reclaimed = d.get("reclaimed") if isinstance(d.get("reclaimed"), dict) else {}
        notes = [*(["finance override"] if d.get("finance_override") else []),
                 *([f"net {int(d['amount'])}, tax {tax}"] if tax else []),
                 # A gateway refund that took back usage_reversal credit (since session 11): the wallet_delta is it.
                 *([f"usage_reversal credit taken back {int(reclaimed['amount'])}"] if reclaimed.get("amount") else []),
                 *([f"owed {int(reclaimed['receivable'])}"] if reclaimed.get("receivable") else []),
                 # ... and what of it a negative adjustment had removed, back from manual_adjustment (session 12).
                 *([f"removed by adjustment {int(reclaimed['from_adjustment'])}"]
                   if reclaimed.get("from_adjustment") else [])]
        dispute = chargeback_of(d)
        if dispute:  # a lost dispute's chargeback, booked as a refund the gateway paid out (since session 13)
            notes.insert(0, f"chargeback {dispute}")
        return {"type": "dispute" if dispute else "refund", "amount": -int(d["amount"]),
                "grant_id": d.get("grant_id"), "reference": d.get("refund_id"), "detail": "; ".join(notes) or None}
    if name == "BalanceAdjusted":
        return {"type": "adjustment", "amount": int(d["amount"]), "reference": d.get("adjustment_id"),
                "user_id": d.get("user"), "detail": d.get("reason")}
    # A hold's ``by`` (since session 13): who placed, captured or released it; older holds name none.
    if name == "HoldPlaced":
        return {"type": "hold_placed", "amount": -int(d["amount"]), "held_delta": int(d["amount"]),
                "hold_id": d.get("hold_id"), "user_id": d.get("by")}
    if name == "HoldCaptured":
        return {"type": "hold_captured", "amount": -int(d["amount"]), "held_delta": -int(d["held_amount"]),
                "hold_id": d.get("hold_id"), "user_id": d.get("by")}
    if name in ("HoldReleased", "HoldExpired"):
        return {"type": "hold_released" if name == "HoldReleased" else "hold_expired", "amount": int(d["amount"]),
                "held_delta": -int(d["amount"]), "hold_id": d.get("hold_id"), "user_id": d.get("by")}
    if name == "ReceivableSettled":
        return {"type": "receivable_settled", "amount": int(d["amount"]), "reference": d.get("settlement_id")}
    if name == "OverageRepaid":  # credit bought (or a late period's recurring credit) paid what was owed
        return {"type": "overage_repaid", "amount": -int(d["amount"]), "grant_id": d.get("grant_id")}
    if name in _INVOICE_TYPES:  # a subscription invoice's fees and tax: owed (negative), then paid or voided
        amount = int(d["amount"])
        negative = name in ("InvoiceBilled", "InvoicePaymentRefunded")
        return {"type": _INVOICE_TYPES[name], "amount": -amount if negative else amount,
                "reference": d.get("invoice") or d.get("note"), "detail": f"net {amount - int(d.get('tax_amount') or 0)}, "
                                                          f"tax {int(d.get('tax_amount') or 0)}"}
    if name in _ROUNDING_TYPES:  # an invoice's usage lines rounded: owed more (rounded up) or less; voided: back
        amount = int(d["amount"])
        reversed_ = name == "InvoicedOverageRoundingReversed"
        return {"type": _ROUNDING_TYPES[name], "amount": amount if reversed_ else -amount,
                "reference": d.get("invoice"), "detail": f"invoice {d.get('invoice')}"}
    if name == "InvoiceChargeRounded":  # a total finer than its currency is charged in: the rest written off
        return {"type": "invoice_charge_rounding", "amount": int(d["amount"]), "reference": d.get("invoice"),
                "detail": f"written off; invoice {d.get('invoice')}"}
    if name == "PurchaseMoneyBooked":
        return {"type": "payment", "amount": int(d["amount"]), "grant_id": d.get("grant_id"),
                "detail": _tax_detail(d)}
    if name == "PurchaseMoneyRefunded":
        dispute = chargeback_of(d)
        return {"type": "dispute" if dispute else "payment_refund", "amount": -int(d["amount"]),
                "grant_id": d.get("grant_id"), "reference": d.get("refund_id"),
                "detail": f"chargeback {dispute}; {_tax_detail(d)}" if dispute else _tax_detail(d)}
    if name in _DISPUTE_EVENTS:
        return _dispute_movement(name, d)
    return None


def _dispute_movement(name: str, d: dict[str, Any]) -> dict[str, Any] | None:
    """A dispute's own events: the customer's credit never moves with them (the chargeback's refund rows do). A fee
    reading that changed nothing (the gateway's fee as before, recorded for its time) is no movement: no row."""
    dispute, amount = d.get("dispute") or str(d.get("key") or "").partition("/")[2], 0
    if name == "DisputeRaised":
        notes = ["opened"]
    elif name == "DisputeFundsWithdrawn":
        notes = [f"funds withdrawn {int(d['amount'])}"]
    elif name == "DisputeFundsReinstated":
        notes = [f"funds reinstated {int(d['amount'])}"]
    elif name == "DisputeFeeBooked":  # the operator's expense: the customer's credit does not move
        change = int(d.get("amount") or 0)
        if d.get("unbooked"):
            notes = [f"fee {int(d['fee'])} {d.get('unit')} not booked (another currency)"]
        elif change:
            notes = [f"fee charged {change}" if change > 0 else f"fee given back {-change}"]
        else:
            return None
    else:
        owed = d.get("owed") if isinstance(d.get("owed"), dict) else {}
        amount = -int(owed.get("receivable") or 0)  # an invoice's payment taken back: owed again
        notes = [str(d.get("outcome")), *([f"funds reinstated {int(d['returned'])}"]
                                          if d.get("returned") and d.get("outcome") != "lost" else []),
                 *([f"owed {-amount}"] if amount else [])]
    return {"type": "dispute", "amount": amount, "reference": dispute, "detail": "; ".join(notes)}


def is_free_usage(data: dict[str, Any]) -> bool:
    """A debit of 0 (usage that cost nothing, sent by rating for the monthly summary's quantity): nothing moved, so
    it is no movement of the history (a free tier's 10,000 calls would be 10,000 rows of 0.00)."""
    return int(data["amount"]) == 0 and not data.get("postings") and not data.get("absorbed")


def give_back_detail(data: dict[str, Any]) -> str:
    """A give-back's detail: ``give-back``, and what of it was absorbed (``UsageDebited.absorbed``, recorded since
    session 9: usage a finance-override refund already paid back, credited to no grant) as ``; absorbed N``."""
    absorbed = data.get("absorbed")
    total = sum(int(part.get("amount") or 0) for part in absorbed if isinstance(part, dict)) \
        if isinstance(absorbed, list) else 0
    return f"give-back; absorbed {total}" if total else "give-back"


def reinstated_detail(data: dict[str, Any]) -> str | None:
    """Late usage of before a downgrade that drew the old plan's allowance the new grant did not hold (since session
    15): that allowance came back into its grant first (``reinstated`` on a draw; the row's wallet_delta has it),
    ``late usage; reinstated N``. None for any other debit."""
    draws = data.get("draws")
    total = sum(int(draw.get("reinstated") or 0) for draw in draws if isinstance(draw, dict)) \
        if isinstance(draws, list) else 0
    return f"late usage; reinstated {total}" if total else None


def _tax_detail(data: dict[str, Any]) -> str:
    """The split of a package's money, in the currency's minor units as every amount here."""
    return f"net {int(data.get('net') or 0)}, tax {int(data.get('tax_amount') or 0)}"


_INVOICE_TYPES = {"InvoiceBilled": "invoice_billed", "InvoicePaid": "invoice_paid",
                  "InvoiceBillVoided": "invoice_voided", "InvoicePaymentRefunded": "invoice_refunded"}
_ROUNDING_TYPES = {"InvoicedOverageRounded": "invoice_rounding",
                   "InvoicedOverageRoundingReversed": "invoice_rounding_reversed"}
_DISPUTE_EVENTS = frozenset({"DisputeRaised", "DisputeFundsWithdrawn", "DisputeFundsReinstated", "DisputeClosed",
                             "DisputeFeeBooked"})
_MOVEMENTS = frozenset({*_INVOICE_TYPES, *_ROUNDING_TYPES, *_DISPUTE_EVENTS, "InvoiceChargeRounded", "CreditGranted", "UsageDebited", "UsageRejected", "GrantExpired", "GrantVoided", "GrantPartVoided",
                        "GrantKeptForLateUsage",
                        "GrantRefunded", "BalanceAdjusted", "HoldPlaced", "HoldCaptured", "HoldReleased", "HoldExpired",
                        "ReceivableSettled", "OverageRepaid", "PurchaseMoneyBooked", "PurchaseMoneyRefunded"})


def handler_for(event_type: str) -> Handler | None:
    aggregate, _, name = event_type.partition(".")
    return project if aggregate == "BillingAccount" and name in _MOVEMENTS else None


def project(fact: Fact, w: BatchWriter) -> None:
    # A usage debit takes debits.project, which writes what this does in one pass with the other read models:
    # a change here goes there too (tests/unit/projections/test_debits.py compares the two).
    if fact.aggregate != "BillingAccount" or not fact.tenant:
        return
    movement = _movement(fact)
    if movement is None:
        return
    data = fact.data
    cause = data.get("cause")
    if not isinstance(cause, dict):
        cause = {}
    properties = cause.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    unit = str(data.get("unit") or "")
    user = first_text(movement.get("user_id"), cause.get("user"), properties.get("user"), cause.get("issued_by"),
                      cause.get("requested_by"))
    event_ids = text_list(cause.get("event_ids") or cause.get("event_id"))
    payment = None
    for name in PAYMENT_KEYS:
        found = cause.get(name)
        if found and isinstance(found, str) and found.strip():
            payment = found.strip()
            break
    w.append(TRANSACTIONS, (
        fact.position, fact.tenant, fact.occurred_at, fact.recorded_at, movement["type"], unit, movement["amount"],
        posting_sums(fact).wallet.get(unit, 0), movement.get("held_delta", 0), data.get("meter") or None,
        _text_or_none(cause.get("quantity")), user or None, _text_or_none(movement.get("grant_id")),
        _text_or_none(movement.get("hold_id")), json_text(event_ids) if event_ids else None, payment,
        _text_or_none(movement.get("reference")), _text_or_none(movement.get("detail")),
        json_text(cause) if cause else None,
    ))


def _text_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


# -- queries ---------------------------------------------------------------------------------------------

COLUMNS = ("position", "tenant", "occurred_at", "recorded_at", "type", "unit", "amount", "wallet_delta",
           "held_delta", "meter", "quantity", "user_id", "grant_id", "hold_id", "event_ids", "payment_id",
           "reference", "detail", "cause")


async def page(db: Database, *, tenant: str | None, types: Sequence[str] = (), since: str | None = None,
               until: str | None = None, meter: str | None = None, user: str | None = None,
               unit: str | None = None, before_position: int | None = None, limit: int) -> list[dict[str, Any]]:
    """Newest first; ``since`` inclusive, ``until`` exclusive (stored time text); keyset on position."""
    where: list[str] = []
    args: list[Any] = []

    def add(sql: str, arg: Any) -> None:
        args.append(arg)
        where.append(sql.replace("?", f"${len(args)}"))

    if tenant is not None:
        add("tenant = ?", tenant)
    if types:
        placeholders = []
        for t in types:
            args.append(t)
            placeholders.append(f"${len(args)}")
        where.append(f"type IN ({', '.join(placeholders)})")
    if since:
        add("occurred_at >= ?", since)
    if until:
        add("occurred_at < ?", until)
    if meter:
        add("meter = ?", meter)
    if user:
        add("user_id = ?", user)
    if unit:
        add("unit = ?", unit)
    if before_position is not None:
        add("position < ?", before_position)
    args.append(limit)
    sql = (f"SELECT {', '.join(COLUMNS)} FROM transactions {'WHERE ' + ' AND '.join(where) if where else ''} "
           f"ORDER BY position DESC LIMIT ${len(args)}")
    return await db.fetch(sql, *args)
