"""Tax rules by region, EU VAT ids, and the B2B reverse charge."""

from decimal import Decimal

import pytest
from billing_ledger.domain.tax import TaxProfileData, check_tax_id, check_vat_id, compute_tax

RULES = [{"region": "DE", "rate": "0.19", "name": "DE VAT"}, {"region": "FR", "rate": "0.20", "name": "FR VAT"},
         {"region": "AT", "rate": "0.20", "name": "AT VAT"},
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


def test_a_vat_id_must_be_of_the_profiles_member_state() -> None:
    # stdnum's eu.vat takes any member state's id: a German id is no Austrian business's.
    mismatch = check_tax_id("AT", "DE136695976")
    assert (mismatch.valid, mismatch.checked, mismatch.country) == (False, True, "DE")
    assert "from DE, not AT" in (mismatch.reason or "")
    assert check_tax_id("DE", "DE 136 695 976").valid
    assert check_tax_id("GR", "EL094259216").valid  # Greece's VAT prefix is EL
    assert not check_tax_id("DE", "EL094259216").valid


def test_no_reverse_charge_on_a_vat_id_of_another_country_than_the_profile() -> None:
    # A profile recorded before ids were checked against its country: an Austrian address with a German id.
    recorded = TaxProfileData("AT", business_name="Deutsche GmbH", tax_id="DE136695976", tax_id_valid=True)
    result = compute_tax(Decimal(100), "EUR", recorded, RULES, "DE")
    assert (result.reverse_charge, result.rule, result.tax) == (False, "AT VAT", Decimal("20.00"))
    # A German business buying from a German seller pays German VAT.
    german = TaxProfileData("DE", business_name="Deutsche GmbH", tax_id="DE136695976", tax_id_valid=True)
    assert compute_tax(Decimal(100), "EUR", german, RULES, "DE").tax == Decimal("19.00")
