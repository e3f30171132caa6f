"""Tax, pure: which rule applies to a customer, what it costs, and EU VAT ids.

Rules come from the catalogue (``tax_rules``): a region (ISO 3166-1 alpha-2 country, or country-subdivision
such as ``US-CA``), a rate (fraction), a name. The customer's tax profile (country, optional subdivision,
business name, tax id) picks the most specific rule. For a business customer in another EU member state than
the seller's, with a valid VAT id of that same member state, the reverse charge applies: no VAT is charged and
the invoice says so. A business in the seller's own country is charged its VAT like anyone there. Tax is computed
once, on the net amount, and rounded once to the currency's minor unit (half-up).

Tax ids (``check_tax_id``): a customer in an EU member state gives an EU VAT id of that member state (checked
with stdnum's ``eu.vat``, which accepts any member state's prefix: the prefix must name the profile's country,
EL or GR for Greece); elsewhere the id is checked by stdnum's module for that country (``gb.vat``, ``ch.vat``,
``us.tin``...) when it has one, and otherwise kept as given, marked unchecked (``tax_id_valid`` false).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from billing_events.money import RATING_CONTEXT, currency, round_minor
from stdnum.eu import vat as eu_vat
from stdnum.exceptions import ValidationError as StdnumError
from stdnum.util import get_cc_module

EU_MEMBER_STATES = frozenset({
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV", "LT", "LU",
    "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE"})


class TaxError(ValueError):
    pass


@dataclass(frozen=True)
class VatCheck:
    valid: bool
    number: str  # compact form, e.g. DE136695976
    country: str | None
    reason: str | None = None
    checked: bool = True  # False: no checker for the country; ``valid`` is then False but the id is not refused


# stdnum module names tried, in order, for a country outside the EU (``gb.vat``, ``ch.vat``, ``us.tin``...).
NATIONAL_TAX_ID_MODULES = ("vat", "tin")


def vat_id_country(number: str | None) -> str | None:
    """The ISO 3166-1 country an EU VAT id's prefix names (EL is Greece's prefix, GR its country code)."""
    prefix = (number or "")[:2].upper()
    if not prefix.isalpha():
        return None
    return "GR" if prefix == "EL" else prefix


def check_vat_id(number: str) -> VatCheck:
    """Format and check digits (python-stdnum). The VIES lookup is a separate, optional adapter."""
    try:
        compact = eu_vat.validate(number)
    except StdnumError as exc:
        compact = "".join(ch for ch in (number or "") if ch.isalnum()).upper()
        return VatCheck(False, compact, None, str(exc) or type(exc).__name__)
    return VatCheck(True, compact, vat_id_country(compact))


def check_tax_id(country: str, number: str) -> VatCheck:
    """A business tax id for a customer in ``country`` (ISO 3166-1 alpha-2): EU VAT in member states, else
    the country's own format when stdnum knows it, else unchecked (kept, ``checked=False``)."""
    country = country.upper()
    if country in EU_MEMBER_STATES:
        check = check_vat_id(number)
        if check.valid and check.country != country:
            # stdnum checks any member state's id (and OSS "EU" ids): a German id on an Austrian profile is well
            # formed, but names another taxable person's country; reverse charge would be granted on it.
            prefix = "EL" if country == "GR" else country
            return VatCheck(False, check.number, check.country,
                            f"the VAT id is from {check.country}, not {country} (a VAT id of {country} "
                            f"starts with {prefix})")
        return check
    compact = "".join(ch for ch in (number or "") if ch.isalnum()).upper()
    module = next((m for m in (get_cc_module(country.lower(), name) for name in NATIONAL_TAX_ID_MODULES)
                   if m is not None), None)
    if module is None:
        return VatCheck(False, compact, country, f"no tax id checker for {country}", checked=False)
    try:
        return VatCheck(True, str(module.validate(number)), country)
    except StdnumError as exc:
        return VatCheck(False, compact, country, str(exc) or type(exc).__name__)


@dataclass(frozen=True)
class TaxProfileData:
    country: str
    subdivision: str | None = None
    business_name: str | None = None
    tax_id: str | None = None
    tax_id_valid: bool = False


@dataclass(frozen=True)
class TaxResult:
    rule: str | None
    rate: Decimal
    net: Decimal
    tax: Decimal
    total: Decimal
    reverse_charge: bool
    note: str | None


def percent_text(rate: Decimal | str) -> str:
    """A tax rate (a fraction) as the percentage an invoice prints: plain decimal notation, no exponent, no trailing
    zeros (0.20 -> "20", 0.1 -> "10", 0.19 -> "19", 0.077 -> "7.7", 0 -> "0"). ``Decimal.normalize()`` alone writes
    a whole number of tens in exponent notation (20 -> "2E+1")."""
    percent = Decimal(str(rate)) * 100
    if percent == percent.to_integral_value():
        return format(percent.quantize(Decimal(1)), "f")
    return format(percent.normalize(), "f")


def pick_rule(rules: list[dict[str, Any]], profile: TaxProfileData) -> dict[str, Any] | None:
    """The most specific rule: country-subdivision first, then country."""
    if profile.subdivision:
        region = f"{profile.country}-{profile.subdivision}"
        for rule in rules:
            if rule["region"] == region:
                return rule
    for rule in rules:
        if rule["region"] == profile.country:
            return rule
    return None


def compute_tax(net: Decimal, unit: str, profile: TaxProfileData | None, rules: list[dict[str, Any]],
                seller_country: str | None) -> TaxResult:
    net = round_minor(net, currency(unit))
    if profile is None:
        return TaxResult(None, Decimal(0), net, Decimal(0), net, False, None)
    # Reverse charge: a business of another member state than the seller's, with a VAT id of its own country (a
    # profile recorded before ids were checked against the country may name another one: charged as not B2B).
    if (profile.business_name and profile.tax_id and profile.tax_id_valid and seller_country
            and profile.country in EU_MEMBER_STATES and seller_country in EU_MEMBER_STATES
            and profile.country != seller_country and vat_id_country(profile.tax_id) == profile.country):
        return TaxResult("eu_reverse_charge", Decimal(0), net, Decimal(0), net, True,
                         f"Reverse charge: VAT to be accounted for by the recipient ({profile.tax_id})")
    rule = pick_rule(rules, profile)
    if rule is None:
        return TaxResult(None, Decimal(0), net, Decimal(0), net, False, None)
    rate = Decimal(str(rule["rate"]))
    tax = round_minor(RATING_CONTEXT.multiply(net, rate), currency(unit))
    return TaxResult(rule.get("name") or rule["region"], rate, net, tax, net + tax, False, None)
