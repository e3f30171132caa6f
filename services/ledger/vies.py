"""VAT registration lookup (the EU's VIES service) behind a small adapter, off by default.

Format and check digits are always verified offline (python-stdnum, ``domain/tax.py``). Whether a number
is actually *registered* needs the network, so it is a separate, optional step that runs in the HTTP
route before the ``tax_profile.set`` command (never inside a ledger transaction): ``BILLING_VIES_ENABLED``
turns it on, ``BILLING_VIES_URL`` points at the service (the EU's VIES REST endpoint by default).
"""

from __future__ import annotations

from typing import Protocol

import httpx

VIES_URL_DEFAULT = "https://ec.europa.eu/taxation_customs/vies/rest-api/check-vat-number"
VIES_TIMEOUT_SECONDS = 5.0


class VatRegistry(Protocol):
    async def is_registered(self, vat_id: str) -> bool | None:
        """True/False from the registry; None when no registry is configured or it could not answer."""


class NoRegistry:
    async def is_registered(self, vat_id: str) -> bool | None:
        return None


class ViesRegistry:
    def __init__(self, url: str = VIES_URL_DEFAULT, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._url = url
        self._transport = transport

    async def is_registered(self, vat_id: str) -> bool | None:
        country, number = vat_id[:2].upper(), vat_id[2:]
        try:
            async with httpx.AsyncClient(transport=self._transport, timeout=VIES_TIMEOUT_SECONDS) as client:
                response = await client.post(self._url, json={"countryCode": "EL" if country == "GR" else country,
                                                              "vatNumber": number})
            if response.status_code != 200:
                return None
            valid = response.json().get("valid")
            return valid if isinstance(valid, bool) else None
        except (httpx.HTTPError, ValueError):
            return None


def registry_from(enabled: bool, url: str | None) -> VatRegistry:
    return ViesRegistry(url or VIES_URL_DEFAULT) if enabled else NoRegistry()
