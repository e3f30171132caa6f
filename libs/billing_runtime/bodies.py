"""Request bodies that a pydantic model describes in the OpenAPI document, handed to the route as sent.

Some routes pass their body on as a ledger command (or to ``validate_document``) whose checks answer a bad field
with their own problem type (``invalid-collection``, ``invalid-command``, ``invalid-catalog``, ...). Validating the
body against a model first would answer some of those with FastAPI's generic ``invalid-request`` and refuse
input the domain accepts today. ``described_by(Model)`` keeps the route's validation where it is (the body must
be a JSON object, as with ``dict[str, Any]``) and only gives the document the model's schema::

    SubscriptionBody = Annotated[dict[str, Any], described_by(SubscriptionCreate), Body()]

The model then is the reference of the fields, their types, descriptions, examples and the constraints the
domain enforces; tests check that its examples are accepted by the route.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, PlainValidator


def _json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("the request body must be a JSON object")  # noqa: TRY004 (pydantic reports ValueErrors)
    return value


def _optional_json_object(value: Any) -> dict[str, Any] | None:
    return None if value is None else _json_object(value)


def described_by(model: type[BaseModel], *, optional: bool = False) -> PlainValidator:
    """``Annotated`` metadata for a ``dict[str, Any]`` body (``| None`` with ``optional``) documented by ``model``."""
    if optional:
        return PlainValidator(_optional_json_object, json_schema_input_type=model | None)
    return PlainValidator(_json_object, json_schema_input_type=model)
