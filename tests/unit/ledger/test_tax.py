"""Tax rules by region, EU VAT ids, and the B2B reverse charge."""

from decimal import Decimal

import pytest
from billing_ledger.domain.tax import TaxProfileData, check_vat_id, compute_tax

RULES = [{"region": "DE", "rate": "0.19", "name": "DE VAT"}, {"region": "FR", "rate": "0.20", "name": "FR VAT"},
         {"region": "US", "rate": "0", "name": "none"}, {"region": "US-CA", "rate": "0.0725", "name": "CA sales"}]


@pytest.mark.parametrize(("number", "valid"), [
    ("DE136695976", True), ("DE 136 695 976", True), ("FR40303265045", True), ("NL004495445B01", True),
    ("DE136695977", False), ("XX123", False), ("", False),
])
def test_vat_ids_are_checked_for_format_and_check_digits(number: str, valid: bool) -> None:
    assert check_vat_id(number).valid is valid


def test_the_most_specific_region_wins_and_tax_is_rounded_once() -> None:
    result = compute_tax(Decimal("10.01"), "USD", TaxProfileData("US", "CA"), RULES, "DE")
    assert (result.rule, result.tax, result.total) == ("CA sales", Decimal("0.73"), Decimal("10.74"))
    assert compute_tax(Decimal(100), "EUR", TaxProfileData("DE"), RULES, "DE").tax == Decimal("19.00")


def test_b2b_in_another_member_state_is_reverse_charged() -> None:
    profile = TaxProfileData("FR", business_name="Acme SAS", tax_id="FR40303265045", tax_id_valid=True)
    result = compute_tax(Decimal(100), "EUR", profile, RULES, "DE")
    assert result.reverse_charge and result.tax == 0 and "Reverse charge" in (result.note or "")
    # Same country, or an invalid id, or a consumer: VAT applies.
    assert compute_tax(Decimal(100), "EUR", TaxProfileData("FR", tax_id="FR40303265045", tax_id_valid=True,
                                                             business_name="x"), RULES, "FR").tax == Decimal("20.00")
    assert compute_tax(Decimal(100), "EUR", TaxProfileData("FR"), RULES, "DE").tax == Decimal("20.00")


def test_no_rule_means_no_tax() -> None:
    assert compute_tax(Decimal(5), "USD", TaxProfileData("JP"), RULES, None).tax == 0
