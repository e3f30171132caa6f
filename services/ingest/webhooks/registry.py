"""Which gateways exist: adding one is a module with ``build(settings) -> Gateway | None`` and a line here."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from billing_ingest.webhooks import Gateway, paypal, razorpay, stripe
from billing_runtime.settings import Settings

GatewayBuilder = Callable[[Settings], Gateway | None]

BUILDERS: Mapping[str, GatewayBuilder] = {
    stripe.NAME: stripe.build,
    razorpay.NAME: razorpay.build,
    paypal.NAME: paypal.build,
}


def enabled_gateways(settings: Settings, builders: Mapping[str, GatewayBuilder] = BUILDERS) -> dict[str, Gateway]:
    """The gateways whose settings are present (a half-configured gateway fails at startup, loudly)."""
    gateways: dict[str, Gateway] = {}
    for name, build in builders.items():
        gateway = build(settings)
        if gateway is not None:
            gateways[name] = gateway
    return gateways
