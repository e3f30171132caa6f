"""Double-entry postings of the credit ledger: the chart of accounts, the posting shape and its invariant.

Every ledger movement is a *posting set*: a list of postings that sums to zero per unit
(:func:`assert_balanced`, called on every movement before its event is recorded). Amounts are signed
integer sub-units (``billing_events.money.SUBUNITS_PER_UNIT`` = 10**9 per unit): **debit positive,
credit negative**. A posting set never mixes units in one balance: a movement in ``CREDIT`` is balanced in
``CREDIT``, its currency value is the package price carried in the movement's ``cause``.

Chart of accounts (the platform's books, one tenant at a time)
--------------------------------------------------------------

``TENANT_WALLET`` (liability)
    The tenant's prepaid credit, one sub-ledger row per grant (``grant_id`` on every wallet posting).
    It *is* the tenant-level sub-ledger of deferred revenue (a contract liability under IFRS 15): buying
    credit books the liability here and only here. We deliberately do **not** post a second
    ``DEFERRED_REVENUE`` leg for purchases: the same liability posted twice would either double count or
    need a reclassification pair that nets to nothing. The general ledger's deferred revenue for prepaid
    credit is the roll-up of all tenants' ``TENANT_WALLET`` balances (a projection), and the wallet's
    credit balance is exactly what the tenant can still spend (see :func:`wallet_delta`).
``DEFERRED_REVENUE`` (liability)
    Consideration billed in advance that is *not yet in a wallet*: subscription fees invoiced for a
    period (``InvoiceBilled``), recognised ratably over it (``FeeRevenueRecognised``). A plan's recurring credit grant reclassifies its
    share into the wallet (Dr ``DEFERRED_REVENUE`` / Cr ``TENANT_WALLET``), so in the currency that share of the
    fee is not on the ratable schedule; voiding it on a plan change moves the remainder back, and the change's
    credit for unused time takes it out again. Also, in the currency, the net money paid for a credit package granted in a
    credit unit (``PurchaseMoneyBooked``): its wallet is in the credit unit, so the money's liability is
    here, recognised in periodic runs as the credit is consumed or lapses (``PurchaseMoneyRecognised``).
``RECOGNISED_REVENUE`` (revenue)
    Earned when credit is consumed (IFRS 15: the performance obligation is satisfied on use), and for
    metered overage. Reversed by give-backs and by finance-override refunds of spent credit.
``BREAKAGE`` (revenue)
    The unused remainder of a grant at its expiry (IFRS 15 B44-B47 breakage, recognised when the
    tenant's right lapses). The grant's ``source`` travels with the event, so reports can net the
    breakage of promotional grants against ``PROMOTIONAL_EXPENSE``.
``PROMOTIONAL_EXPENSE`` (expense)
    Funds promotional and courtesy (``manual``) grants: free credit has no consideration behind it.
``MANUAL_ADJUSTMENT`` (expense / contra)
    Added to the requested chart: the counter-account of admin/finance balance corrections
    (:meth:`BillingAccount.adjust`), kept apart from promotions so finance can review corrections alone.
``RECEIVABLES`` (asset)
    What the tenant owes: usage beyond its credit under the ``overage`` policy, and the fees and tax of
    unpaid subscription invoices. Reduced by give-backs (overage only) and by settlements (the invoice paid).
``GATEWAY_CLEARING`` (asset)
    Cash in transit at the payment gateway: purchases are paid in here, refunds paid out from here.
``DISPUTED_FUNDS`` (asset)
    Money the gateway withdrew from our balance for an open dispute (a chargeback under way): no longer in
    clearing, not yet lost. Reinstated (a won dispute) it goes back to clearing; when the dispute is lost it goes
    back to clearing too and the chargeback pays it out from there like a refund, so clearing moves once.
``DISPUTE_FEES`` (expense)
    What gateways charge the operator for handling a dispute (Stripe's dispute fee in the dispute's balance
    transactions, PayPal's dispute and chargeback fees in its money movements): a cost the operator bears, never
    the tenant's. Paid out of the gateway's clearing; a fee the gateway gives back (a won Stripe dispute in some
    regions) comes back to it (since session 14).
``TAX_PAYABLE`` (liability)
    Tax collected on purchases (computed by the caller, in the grant's unit), reversed by refunds.

Movements (``Dr`` = positive amount, ``Cr`` = negative amount)
--------------------------------------------------------------

=========================  ====================================================================
credit purchase            Dr GATEWAY_CLEARING (net + tax) / Cr TENANT_WALLET net / Cr TAX_PAYABLE tax
                           (net = the money paid; a checkout's bonus or discount is a promotion grant)
plan recurrence grant      Dr DEFERRED_REVENUE / Cr TENANT_WALLET
promotion, manual grant    Dr PROMOTIONAL_EXPENSE / Cr TENANT_WALLET
refund reversal grant      Dr GATEWAY_CLEARING / Cr TENANT_WALLET (a refund the gateway reversed)
usage drawn from credit    Dr TENANT_WALLET (per grant drawn) / Cr RECOGNISED_REVENUE (same grant)
usage beyond credit        Dr RECEIVABLES / Cr RECOGNISED_REVENUE            (``overage`` policy)
usage give-back            Dr RECOGNISED_REVENUE / Cr RECEIVABLES first, then / Cr TENANT_WALLET
hold placed / released     no postings (an authorisation is not a movement; see ``held``)
hold captured              as usage
grant expiry               Dr TENANT_WALLET remainder / Cr BREAKAGE
grant voided               Dr TENANT_WALLET remainder / Cr the account that funded the grant (Cr BREAKAGE the
                           part that lapsed: a plan credit above its rollover cap, or its fee given back in full)
refund of a purchase       Dr TENANT_WALLET unspent / Dr TAX_PAYABLE tax / Cr GATEWAY_CLEARING total;
                           with a finance override the part no longer in the wallet is reversed
                           from BREAKAGE (if it lapsed), then from MANUAL_ADJUSTMENT (if a negative
                           adjustment removed it) and then from RECOGNISED_REVENUE (if spent)
adjustment (+ / -)         Dr MANUAL_ADJUSTMENT / Cr TENANT_WALLET  (and the reverse)
receivable settled         Dr GATEWAY_CLEARING / Cr RECEIVABLES
subscription invoice       Dr RECEIVABLES fees + tax / Cr DEFERRED_REVENUE the fees of the service period
                           (Cr RECOGNISED_REVENUE fees without one) / Cr TAX_PAYABLE tax (``InvoiceBilled``
                           at finalize: base fee, proration, discount; its usage and overage lines are
                           receivable already); an upgrade's credit for unused time: Dr DEFERRED_REVENUE of the
                           invoice it corrects (the rest Dr RECOGNISED_REVENUE)
fee revenue recognised     Dr DEFERRED_REVENUE / Cr RECOGNISED_REVENUE, per invoice, ratably over its
                           service period (``FeeRevenueRecognised``, a periodic run)
invoice usage rounding     Dr RECEIVABLES / Cr RECOGNISED_REVENUE (the reverse when rounded down): what a
                           finalized invoice's rounded usage, credits-applied and overage lines bill beyond the
                           overage it took, exact (``InvoicedOverageRounded``); reversed when it is voided unpaid
invoice paid               Dr GATEWAY_CLEARING / Cr RECEIVABLES (``InvoicePaid`` for fees + tax, and
                           ``ReceivableSettled`` for the overage it billed)
invoice charge rounding    Dr RECOGNISED_REVENUE / Cr RECEIVABLES what a gateway cannot charge of a total finer than
                           its currency is charged in (12.957 KWD, finalized before session 13, paid 12.950), written
                           off before the payment clears the rest (``InvoiceChargeRounded``)
subscription credit note   Dr DEFERRED_REVENUE (what the corrected invoice still defers) / Dr
                           RECOGNISED_REVENUE (the rest of the net) / Dr TAX_PAYABLE tax / Cr TENANT_WALLET (a
                           grant, source ``credit_note``: account credit in the currency); a void or a refund
                           of an invoice takes its net back the same way
package money booked       Dr GATEWAY_CLEARING total / Cr DEFERRED_REVENUE net / Cr TAX_PAYABLE tax
                           (in the currency, for a purchase granted in a credit unit)
package money recognised   Dr DEFERRED_REVENUE / Cr RECOGNISED_REVENUE (credit consumed) / Cr BREAKAGE
                           (credit lapsed), in the currency, per grant, by a periodic run (negative
                           amounts reverse it after give-backs); never on the usage path
package money refunded     Dr DEFERRED_REVENUE (Dr RECOGNISED_REVENUE / Dr BREAKAGE as far as already
                           recognised for the credit refunded) / Dr TAX_PAYABLE / Cr GATEWAY_CLEARING
dispute funds withdrawn    Dr DISPUTED_FUNDS / Cr GATEWAY_CLEARING (``DisputeFundsWithdrawn``); reinstated, or
                           the dispute closed won or without a chargeback: the reverse
dispute lost               Dr GATEWAY_CLEARING / Cr DISPUTED_FUNDS what was withdrawn (``DisputeClosed``), then
                           the chargeback as a refund of a purchase (above, with the override: spent credit
                           from RECOGNISED_REVENUE); of an invoice's payment: Dr RECEIVABLES / Cr
                           GATEWAY_CLEARING, owed again; part of a checkout order's payment: that share of it
                           (its credit, tax and bonus in proportion), the order stays paid
dispute fee                Dr DISPUTE_FEES / Cr GATEWAY_CLEARING what the gateway charged for a dispute, the
                           reverse what it gave back (``DisputeFeeBooked``: the change of its net fee)
bonus voided in part       Dr TENANT_WALLET / Cr the account that funded the grant (``GrantPartVoided``: a
                           partial chargeback's share of an order's bonus, at most what is left of it)
=========================  ====================================================================

Postings are plain dicts (JSON-transcodable by eventsourcing), never custom classes, because they are
stored inside events.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import TypedDict


class LedgerAccount(StrEnum):
    TENANT_WALLET = "tenant_wallet"
    DEFERRED_REVENUE = "deferred_revenue"
    RECOGNISED_REVENUE = "recognised_revenue"
    BREAKAGE = "breakage"
    PROMOTIONAL_EXPENSE = "promotional_expense"
    RECEIVABLES = "receivables"
    GATEWAY_CLEARING = "gateway_clearing"
    TAX_PAYABLE = "tax_payable"
    MANUAL_ADJUSTMENT = "manual_adjustment"
    DISPUTED_FUNDS = "disputed_funds"
    DISPUTE_FEES = "dispute_fees"


class GrantSource(StrEnum):
    PURCHASE = "purchase"
    PLAN_RECURRENCE = "plan_recurrence"
    PROMOTION = "promotion"
    MANUAL = "manual"
    REFUND_REVERSAL = "refund_reversal"
    # Created by the ledger itself when a usage give-back cannot go back to the grants it was drawn
    # from (they lapsed meanwhile): never accepted from callers of ``grant_credit``.
    USAGE_REVERSAL = "usage_reversal"
    # Created by the ledger for a subscription credit note (account credit in the currency): never accepted
    # from callers of ``grant_credit``.
    CREDIT_NOTE = "credit_note"


# The account that pays for a grant's credit, by source (credit side is always TENANT_WALLET).
FUNDING_ACCOUNT: dict[str, LedgerAccount] = {
    GrantSource.PURCHASE: LedgerAccount.GATEWAY_CLEARING,
    GrantSource.PLAN_RECURRENCE: LedgerAccount.DEFERRED_REVENUE,
    GrantSource.PROMOTION: LedgerAccount.PROMOTIONAL_EXPENSE,
    GrantSource.MANUAL: LedgerAccount.PROMOTIONAL_EXPENSE,
    GrantSource.REFUND_REVERSAL: LedgerAccount.GATEWAY_CLEARING,
    GrantSource.USAGE_REVERSAL: LedgerAccount.RECOGNISED_REVENUE,
    GrantSource.CREDIT_NOTE: LedgerAccount.RECOGNISED_REVENUE,
}

# Grants bought with money: only these may be refunded (others are voided).
PAID_SOURCES: frozenset[str] = frozenset({GrantSource.PURCHASE, GrantSource.REFUND_REVERSAL})

_ACCOUNTS: frozenset[str] = frozenset(a.value for a in LedgerAccount)


class Posting(TypedDict):
    """One line of a posting set, as stored in events (a plain dict at run time)."""

    account: str
    unit: str
    amount: int  # signed sub-units: debit positive, credit negative
    grant_id: str | None


def posting(account: LedgerAccount, unit: str, amount: int, grant_id: str | None = None) -> Posting:
    return {"account": account.value, "unit": unit, "amount": amount, "grant_id": grant_id}


def assert_balanced(postings: Iterable[Posting]) -> None:
    """Raises ``UnbalancedPostings`` unless the set sums to zero per unit and every line is well formed.

    Zero-amount lines are refused too: they carry no information and hide bugs.
    """
    sums: dict[str, int] = {}
    for line in postings:
        amount = line.get("amount")
        if type(amount) is not int or amount == 0:
            raise UnbalancedPostings(f"posting amount must be a non-zero int of sub-units: {line!r}")
        if line.get("account") not in _ACCOUNTS:
            raise UnbalancedPostings(f"unknown ledger account in {line!r}")
        unit = line.get("unit")
        if not isinstance(unit, str) or not unit:
            raise UnbalancedPostings(f"posting without a unit: {line!r}")
        sums[unit] = sums.get(unit, 0) + amount
    unbalanced = {unit: total for unit, total in sums.items() if total != 0}
    if unbalanced:
        raise UnbalancedPostings(f"posting set does not sum to zero per unit: {unbalanced}")


def wallet_delta(postings: Iterable[Posting]) -> dict[str, int]:
    """Change of the tenant's wallet balance per unit (positive = more to spend).

    The wallet is a liability, so its credits (negative amounts) are what the tenant may spend. The sum
    over all of an account's events equals ``available(unit) + held(unit)``: holds are authorisations,
    not movements, so they never appear in postings.
    """
    delta: dict[str, int] = {}
    for line in postings:
        if line["account"] == LedgerAccount.TENANT_WALLET:
            delta[line["unit"]] = delta.get(line["unit"], 0) - line["amount"]
    return delta


def account_balances(postings: Iterable[Posting]) -> dict[tuple[str, str], int]:
    """Signed balance (debit positive) per (account, unit): what a projection derives from postings."""
    balances: dict[tuple[str, str], int] = {}
    for line in postings:
        key = (line["account"], line["unit"])
        balances[key] = balances.get(key, 0) + line["amount"]
    return balances


class UnbalancedPostings(AssertionError):
    """A posting set that does not sum to zero per unit: a programming error, never bad input."""
