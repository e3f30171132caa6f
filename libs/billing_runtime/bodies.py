"""Request bodies that a pydantic model describes in the OpenAPI document, handed to the route as sent.

Some routes pass their body on as a ledger command (or to ``validate_document``) whose checks answer a bad field
with their own problem type (``invalid-collection``, ``invalid-command``, ``invalid-catalog``, ...). Validating the
body against a model first would answer some of those with FastAPI's generic ``invalid-request`` and refuse
input the domain accepts today. ``described_by(Model)`` keeps the route's validation where it is (the body must
be a JSON object, as with ``dict[str, Any]``) and only gives the document the model's schema::

    SubscriptionBody = Annotated[dict[str, Any], described_by(SubscriptionCreate), Body()]

The model then is the reference of the fields, their types, descriptions, examples and the constraints the
domain enforces; tests check that its examples are accepted by the route. A model that forbids extra fields
(``extra="forbid"``) has the body's fields it does not name refused (422 ``invalid-request`` naming them), before the
route runs: a misspelt field (``quantitty``) is never dropped without a word, so nothing is changed by a request the
client did not mean (since session 15).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, PlainValidator


def _json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("the request body must be a JSON object")  # noqa: TRY004 (pydantic reports ValueErrors)
    return value


def _known_fields(model: type[BaseModel]) -> frozenset[str] | None:
    """The body fields ``model`` names (with their aliases); None when it lets others through."""
    if model.model_config.get("extra") != "forbid":
        return None
    return frozenset(name for key, field in model.model_fields.items() for name in (key, field.alias) if name)


def _object_of(model: type[BaseModel], let_through: frozenset[str]) -> Callable[[Any], dict[str, Any]]:
    known = _known_fields(model)

    def check(value: Any) -> dict[str, Any]:
        body = _json_object(value)
        unknown = sorted(set(body) - known - let_through) if known is not None else []
        if unknown:
            raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                             f"this body takes {', '.join(sorted(known or ()))}; nothing was changed")
        return body

    return check


def described_by(model: type[BaseModel], *, optional: bool = False,
                 refused_by_route: tuple[str, ...] = ()) -> PlainValidator:
    """``Annotated`` metadata for a ``dict[str, Any]`` body (``| None`` with ``optional``) documented by ``model``;
    a field it does not name is refused when the model forbids extra fields, but for ``refused_by_route``: fields
    the route refuses itself, in its own words (a payment method's ``card``)."""
    check = _object_of(model, frozenset(refused_by_route))
    if optional:
        return PlainValidator(lambda value: None if value is None else check(value),
                              json_schema_input_type=model | None)
    return PlainValidator(check, json_schema_input_type=model)
