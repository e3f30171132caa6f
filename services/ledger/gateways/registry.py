"""Which outbound gateways exist; the operator enables one by configuring its credentials."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from billing_ledger.gateways import OutboundGateway, paypal, razorpay, stripe
from billing_runtime.settings import Settings

BUILDERS: Mapping[str, Callable[[Settings], OutboundGateway | None]] = {
    stripe.NAME: stripe.build,
    razorpay.NAME: razorpay.build,
    paypal.NAME: paypal.build,
}


def enabled_gateways(settings: Settings) -> dict[str, OutboundGateway]:
    gateways: dict[str, OutboundGateway] = {}
    for name, build in BUILDERS.items():
        gateway = build(settings)
        if gateway is not None:
            gateways[name] = gateway
    return gateways
