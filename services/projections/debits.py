"""Usage debits, the bulk of ``billing.ledger.events``: every read model's share of one in ONE pass.

A ``BillingAccount.UsageDebited`` feeds six read models (balances, history, monthly usage, AI usage,
figures, revenue; the last since session 14). Called one after another, their handlers each look up the cause, the properties, the amount and
the unit again, and each row change goes through the writer's general ``upsert``; at tens of thousands of
events per second (a rebuild, a busy consumer) that repetition counts. ``project`` here writes
exactly the rows those six handlers write (same keys, same values, same ``set``/``add`` merge, see
``BatchWriter.upsert``), reading each field once and adding straight into the
columns of rows it created itself: 14 us of CPU per debit instead of 24 for the five handlers of then (the bench's
events, handlers alone, each batch's events decoded first). The shared rules stay in their modules
(``facts.posting_sums``, ``ai_usage.tokens_by_class``, ...); their usual cases are written out here (postings of
text accounts and units walked in place, keyed by their rows' keys; a plain quantity or ``contribution`` and the
priced token texts decoded without a call each; one event id as is), anything else takes the shared rule. A debit
whose shape is unusual (it grants credit, has no tenant, draws a grant through a carry) goes through the six handlers themselves. ``tests/unit/projections/test_debits.py``
checks that both paths write identical rows for every shape of debit.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from billing_projections import ai_usage, balances, figures, history, revenue, usage_monthly
from billing_projections.facts import (
    RECEIVABLES,
    WALLET,
    Fact,
    decimal_or_none,
    first_text,
    json_text,
    local_month,
    posting_sums,
)
from billing_projections.writer import BatchWriter, Handler, _Row, merge_add, merge_set

EVENT_TYPE = "BillingAccount.UsageDebited"

_LEDGER_BALANCES = balances.LEDGER_BALANCES
_WALLETS = balances.WALLETS
_GRANTS = balances.GRANTS
_USAGE_MONTHLY = usage_monthly.USAGE_MONTHLY
_AI_USAGE = ai_usage.AI_USAGE
_FIGURES_DAILY = figures.FIGURES_DAILY
_REVENUE_DAILY = revenue.REVENUE_DAILY
_TRANSACTIONS = history.TRANSACTIONS
_TABLES = (_LEDGER_BALANCES, _WALLETS, _GRANTS, _USAGE_MONTHLY, _AI_USAGE, _FIGURES_DAILY, _REVENUE_DAILY)
_RECOGNISED = revenue.RECOGNISED
_TOKEN_COLUMNS = {c: f"{c}_tokens" for c in ai_usage.TOKEN_CLASSES}
_PAYMENT_KEYS = history.PAYMENT_KEYS
_PAYMENT_KEY_SET = frozenset(_PAYMENT_KEYS)
_SEQUENCES = (list, tuple)  # ``list | tuple`` would build its union on every call
_ZERO = Decimal(0)
# A cause with none of these keys: usage_monthly.metered_quantity is its quantity (or 0).
_METERED_KEYS = frozenset(("contribution", "closed", "ai_prices", "quantity_before", "quantity_after", "corrects"))
_CLASS_NAMES = ai_usage._CLASS_NAMES
# ``facts.json_text`` of a list of strings: it has no keys to sort, nor an integer orjson cannot write.
_dumps = orjson.dumps

# The read models' own handlers of a debit, in service order: the fallback, and the reference of the tests.
HANDLERS: tuple[Handler, ...] = tuple(
    h for m in (balances, history, usage_monthly, ai_usage, figures, revenue)
    if (h := m.handler_for(EVENT_TYPE)) is not None)


def handler_for(event_type: str) -> Handler | None:
    return project if event_type == EVENT_TYPE else None


def _through_carry(data: dict[str, Any]) -> bool:
    """Whether a debit drew a grant through a carry into it, or an old allowance reinstated (late usage of the period
    before, rare): its grants' rows count it too (``balances.carry_drawn``), its history row says so."""
    draws = data.get("draws")
    return type(draws) is list and any(type(d) is dict and ("carry_of" in d or "reinstated" in d) for d in draws)


def project(fact: Fact, w: BatchWriter) -> None:
    tenant = fact.tenant
    data = fact.data
    if not tenant or data.get("credit_grant") is not None or fact.aggregate != "BillingAccount" or _through_carry(data):
        for handler in HANDLERS:  # nothing (no tenant), a grant too, or late usage through a carry: the general path
            handler(fact, w)
        return
    position = fact.position
    amount = int(data["amount"])
    unit = data.get("unit")
    cause = data.get("cause")
    if type(cause) is not dict:
        cause = {}
    properties = cause.get("properties")
    if type(properties) is not dict:
        properties = {}
    balance_rows, wallet_rows, grant_rows, monthly_rows, ai_rows, figure_rows, revenue_rows = w.rows_of_tables(_TABLES)
    transactions = w.appended_of(_TRANSACTIONS)
    # Each row: ``BatchWriter.upsert``'s merge, written out (the row's first change in the batch keeps the
    # fresh dicts; a row seen already takes each value by the rules of ``merge_set`` / ``merge_add``). A row
    # this handler created has its added columns in ``row.add`` already: adding there directly is that rule, as it is
    # for any row whose column is in ``row.add`` (the writer never keeps a column in both ``set`` and ``add``).

    # balances (balances._project_debit): ledger accounts, the wallet, the grants drawn (facts.posting_sums, walked
    # here: each account's sum keyed by its row's key at once, without a ``PostingSums`` per debit).
    wallet: dict[Any, int] = {}  # unit -> change of the tenant's wallet
    grants: dict[Any, int] = {}
    accounts: dict[tuple[str, str, str], int] = {}
    lines = data.get("postings")
    if fact.sums is not None or not (type(lines) is list or isinstance(lines, list)):
        lines = ()  # walked already, or none: posting_sums below
    for line in lines:
        account, posted_unit, posted = line.get("account"), line["unit"], line["amount"]
        if type(account) is not str or type(posted_unit) is not str:
            lines = None  # keys made with str(): posting_sums' own walk below
            break
        if type(posted) is not int:
            posted = int(posted)
        row_key = (tenant, account, posted_unit)
        accounts[row_key] = accounts.get(row_key, 0) + posted
        if account == WALLET:
            wallet[posted_unit] = wallet.get(posted_unit, 0) - posted
            grant = line.get("grant_id")
            if grant:
                grants[grant] = grants.get(grant, 0) - posted
    if not lines:  # no postings, not walked here
        sums = posting_sums(fact)
        wallet, grants = sums.wallet, sums.grants
        accounts = {(tenant, key[0], key[1]): total for key, total in sums.accounts.items()}
    receivable: dict[str, int] = {}
    for row_key, total in accounts.items():
        row = balance_rows.get(row_key)
        if row is None:
            balance_rows[row_key] = _Row({}, {"last_position": position}, {"amount": total})
        elif "amount" in (row_add := row.add) and "last_position" not in row_add:  # the usual: added to already
            row.set["last_position"] = position
            if total:
                row_add["amount"] += total
        else:
            _merge(row, position, "amount", total)
        if row_key[1] == RECEIVABLES:
            receivable[row_key[2]] = total
    for grant_id, delta in grants.items():
        row_key = (grant_id,)
        row = grant_rows.get(row_key)
        if row is None:
            grant_rows[row_key] = _Row({}, {"last_position": position}, {"remaining": delta})
        elif "remaining" in (row_add := row.add) and "last_position" not in row_add:
            row.set["last_position"] = position
            if delta:
                row_add["remaining"] += delta
        else:
            _merge(row, position, "remaining", delta)
    recorded_at = fact.recorded_at
    if receivable:
        touched: Any = (*receivable, *(u for u in wallet if u not in receivable),
                        *((unit,) if isinstance(unit, str) and unit not in receivable and unit not in wallet else ()))
    else:  # the usual: the same units in the same order, without building them one by one
        touched = (*wallet, unit) if isinstance(unit, str) and unit not in wallet else wallet
    if touched:
        for one in touched:
            add: dict[str, Any] = {}
            if one in receivable:
                add["receivable"] = receivable[one]
            if one in wallet:
                add["balance"] = wallet[one]
            row_key = (tenant, one)
            row = wallet_rows.get(row_key)
            if row is None:
                wallet_rows[row_key] = _Row({}, {"updated_at": recorded_at, "last_position": position}, add)
            else:
                row_set, row_add = row.set, row.add
                row_set["updated_at"] = recorded_at
                row_set["last_position"] = position
                if row_add and ("updated_at" in row_add or "last_position" in row_add):
                    row_add.pop("updated_at", None)
                    row_add.pop("last_position", None)
                for column, delta in add.items():
                    if column in row_add and column not in row_set:
                        if delta:
                            row_add[column] += delta
                    else:
                        merge_add(row, column, delta)

    # history.project: one transactions row.
    text_unit = str(unit or "")
    event_ids = cause.get("event_ids") or cause.get("event_id")
    if type(event_ids) is list and len(event_ids) == 1 and type(event_ids[0]) is str:
        pass  # the usual: one usage event's id (the list of its ``str``s is the same list)
    elif isinstance(event_ids, _SEQUENCES):
        event_ids = [str(v) for v in event_ids]
    else:
        event_ids = [event_ids] if isinstance(event_ids, str) and event_ids else []
    payment = None
    for name in () if _PAYMENT_KEY_SET.isdisjoint(cause) else _PAYMENT_KEYS:
        found = cause.get(name)
        if found and type(found) is str:
            found = found.strip()
            if found:
                payment = found
                break
    quantity_value = cause.get("quantity")
    reference = data.get("command_id")
    user = cause.get("user")  # first_text(cause's user, properties' user), written out
    if type(user) is not str or not user or not (user := user.strip()):
        user = first_text(properties.get("user"))
    occurred_at = fact.occurred_at
    if position not in transactions and (amount or data.get("postings") or data.get("absorbed")):
        # BatchWriter.append (an existing row is kept); a debit of 0 is no movement (history.is_free_usage)
        transactions[position] = (
            position, tenant, occurred_at, recorded_at, "usage", text_unit, -amount,
            wallet.get(text_unit, 0), 0, data.get("meter") or None,
            None if quantity_value is None or quantity_value == "" else str(quantity_value),
            user or first_text(cause.get("issued_by"), cause.get("requested_by")) or None, None, None,
            _dumps(event_ids).decode() if event_ids else None, payment,
            None if reference is None or reference == "" else str(reference),
            history.give_back_detail(data) if amount < 0 else None,
            json_text(cause) if cause else None,
        )

    # usage_monthly.project
    meter = str(data["meter"])
    unit_key = str(data["unit"])
    if _METERED_KEYS.isdisjoint(cause):  # metered_quantity of a debit with none of them: its quantity, else 0
        if type(quantity_value) is str:
            try:
                quantity = Decimal(quantity_value)
            except InvalidOperation:
                quantity = 0
            else:
                if not quantity.is_finite() or not quantity:
                    quantity = 0
        else:
            quantity = decimal_or_none(quantity_value) or 0
    else:
        contributed = cause.get("contribution")  # what its event added (rating, since session 9): the usual
        quantity = None
        if type(contributed) is str:
            try:
                quantity = Decimal(contributed)
            except InvalidOperation:
                pass
            else:
                if not quantity.is_finite():
                    quantity = None
        if quantity is None:
            quantity = usage_monthly.metered_quantity(cause)
    zone = cause.get("time_zone")  # month_of, written out: the usual debit names no zone (UTC)
    month = occurred_at[:7] if not zone else local_month(occurred_at, zone)
    usage_type = cause.get("usage_type")
    if type(usage_type) is not str or not (usage_type := usage_type.strip()):
        usage_type = meter
    events = usage_monthly.counted_events(cause) if "closed" in cause or "refusal_of" in cause else 1
    row_key = (tenant, month, meter, unit_key)
    row = monthly_rows.get(row_key)
    if row is None:
        monthly_rows[row_key] = _Row({}, {"usage_type": usage_type, "last_position": position},
                                     {"quantity": quantity, "cost": amount, "events": events})
    else:
        row_set, row_add = row.set, row.add
        if ("quantity" in row_add and "cost" in row_add and "events" in row_add and "usage_type" in row_set
                and "last_position" not in row_add):
            row_set["usage_type"] = usage_type
            row_set["last_position"] = position  # not an added column of this table
            if quantity:
                row_add["quantity"] += quantity
            if amount:
                row_add["cost"] += amount
            row_add["events"] += events
        else:
            merge_set(row, "usage_type", usage_type)
            _merge(row, position, "quantity", quantity)
            merge_add(row, "cost", amount)
            merge_add(row, "events", events)

    # ai_usage.project
    if cause:
        model = properties.get("model")  # first_text(properties' model, cause's model), written out
        if type(model) is not str or not model or not (model := model.strip()):
            model = first_text(cause.get("model"))
        if model:
            # ai_usage.project: the event's own quantity (a count meter's or a correction's metered quantity is not
            # its tokens)
            # (tokens_by_class's first rule written out: the token counts rating priced, a map of decimal texts)
            per_class: dict[str, Decimal] | None = None
            priced = cause.get("tokens")
            if type(priced) is dict:
                found: dict[str, Decimal] = {}
                for name, count in priced.items():
                    token_class = _CLASS_NAMES.get(name) or _CLASS_NAMES.get(str(name).lower())
                    if not token_class:
                        continue
                    if type(count) is str:  # decimal_or_none, written out
                        try:
                            number = Decimal(count)
                        except InvalidOperation:
                            continue
                        if not number.is_finite():
                            continue
                    else:
                        number = decimal_or_none(count)
                        if number is None:
                            continue
                    found[token_class] = found[token_class] + number if token_class in found else number
                if found:
                    per_class, total_tokens = found, sum(found.values(), _ZERO)
            if per_class is None:
                per_class, total_tokens = ai_usage.tokens_by_class(cause, properties,
                                                                   decimal_or_none(quantity_value) or _ZERO)
            operation = cause.get("operation")  # first_text(cause's, properties' operation)
            if type(operation) is not str or not operation or not (operation := operation.strip()):
                operation = first_text(properties.get("operation"))
            row_key = (tenant, month, model, operation, user, unit_key)
            row = ai_rows.get(row_key)
            if row is None:
                add = {_TOKEN_COLUMNS[c]: count for c, count in per_class.items()}
                add["tokens"] = total_tokens
                add["cost"] = amount
                add["events"] = 1
                ai_rows[row_key] = _Row({}, {"last_position": position}, add)
            else:
                row.set["last_position"] = position  # merge_set
                row_add = row.add
                if "last_position" in row_add:
                    del row_add["last_position"]
                for token_class, count in per_class.items():
                    column = _TOKEN_COLUMNS[token_class]
                    if column in row_add:
                        if count:
                            row_add[column] += count
                    else:
                        merge_add(row, column, count)
                if "tokens" in row_add and "cost" in row_add and "events" in row_add:
                    if total_tokens:
                        row_add["tokens"] += total_tokens
                    if amount:
                        row_add["cost"] += amount
                    row_add["events"] += 1
                else:
                    merge_add(row, "tokens", total_tokens)
                    merge_add(row, "cost", amount)
                    merge_add(row, "events", 1)

    # figures.project
    overage = int(data.get("overage") or 0)
    if amount or overage:
        row_key = (tenant, occurred_at[:10], unit_key)
        row = figure_rows.get(row_key)
        if row is None:
            add = {"consumed": amount} if amount else {}
            if overage:
                add["receivables"] = overage
            figure_rows[row_key] = _Row({}, {"last_position": position}, add)
        else:
            row.set["last_position"] = position  # merge_set
            row_add = row.add
            if "last_position" in row_add:
                del row_add["last_position"]
            if amount:
                if "consumed" in row_add:
                    row_add["consumed"] += amount
                else:
                    merge_add(row, "consumed", amount)
            if overage:
                merge_add(row, "receivables", overage)

    # revenue.project (revenue.flows, written out): a debit's postings besides the wallet (deferred revenue) are
    # revenue and overage owed, both its flow recognised_usage (what left deferred revenue: the wallet's debit), and the
    # revenue recognised (or given back). Anything else takes the read model's own rule.
    revenue_flows: dict[str, list[int]] = {}  # unit -> [recognised_usage, revenue_usage]
    for (_, account, posted_unit), total in accounts.items():
        if account == WALLET:
            continue
        if account == _RECOGNISED:
            found = revenue_flows.setdefault(posted_unit, [0, 0])
            found[0] -= total
            found[1] -= total
        elif account == RECEIVABLES:
            revenue_flows.setdefault(posted_unit, [0, 0])[0] -= total
        else:
            revenue_flows = {}
            revenue.project(fact, w)
            break
    revenue_add: dict[str, dict[str, int]] = {}
    for posted_unit, (used, earned) in revenue_flows.items():
        add = {"recognised_usage": used} if used else {}
        if earned:
            add["revenue_usage"] = earned
        if add:
            revenue_add[posted_unit] = add
    for posted_unit in sorted(revenue_add) if len(revenue_add) > 1 else revenue_add:
        add = revenue_add[posted_unit]
        row_key = (tenant, occurred_at[:10], posted_unit)
        row = revenue_rows.get(row_key)
        if row is None:
            revenue_rows[row_key] = _Row({}, {"last_position": position}, add)
        else:
            row.set["last_position"] = position  # merge_set
            row_add = row.add
            if "last_position" in row_add:
                del row_add["last_position"]
            for column, delta in add.items():
                if column in row_add and column not in row.set:
                    row_add[column] += delta
                else:
                    merge_add(row, column, delta)


def _merge(row: _Row, position: int, column: str, value: Any) -> None:
    """``merge_set(row, "last_position", position)`` then ``merge_add(row, column, value)``."""
    row.set["last_position"] = position
    row_add = row.add
    if row_add and "last_position" in row_add:
        del row_add["last_position"]
    merge_add(row, column, value)
