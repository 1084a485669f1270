"""An AsyncAPI 3.0 document generated from the event registry (`kabinet docs asyncapi`)."""

from __future__ import annotations

from typing import Any

from kabinet_contracts.envelope import PREVIOUS_POSITION_HEADER, IntegrationEvent
from kabinet_contracts.registry import EventRegistry

# Where a schema's references to the models inside it point: beside it, in the document.
_REF_TEMPLATE = "#/components/schemas/{model}"


def _add_schema(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """Puts a pydantic JSON schema under components/schemas, and the models it refers to
    (pydantic's `$defs`, which its `$ref`s name through _REF_TEMPLATE) beside it, so that
    every `$ref` of the document resolves. Two different schemas under one name would
    make a `$ref` mean the wrong one: refused."""
    schema = dict(schema)
    for model_name, definition in schema.pop("$defs", {}).items():
        _add_one(schemas, model_name, definition)
    _add_one(schemas, name, schema)


def _add_one(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    if schemas.setdefault(name, schema) != schema:
        raise ValueError(f"two different schemas are named {name!r} in the AsyncAPI document: rename one of the models")


def asyncapi_document(registry: EventRegistry, version: str = "0.1.0") -> dict[str, Any]:
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    _add_schema(schemas, "IntegrationEvent", IntegrationEvent.model_json_schema(ref_template=_REF_TEMPLATE))
    operations: dict[str, Any] = {}
    for event_type in registry.all():
        message_name = f"{event_type.name.replace('.', '_')}_v{event_type.schema_version}"
        payload_name = f"{message_name}_payload"
        _add_schema(schemas, payload_name, event_type.payload.model_json_schema(ref_template=_REF_TEMPLATE))
        messages[message_name] = {
            "name": event_type.name,
            "title": f"{event_type.name} v{event_type.schema_version}",
            "summary": event_type.summary,
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    "traceparent": {"type": "string", "description": "W3C trace context"},
                    "type": {"type": "string", "description": "the event type, as in the payload"},
                    "schema_version": {"type": "string", "description": "the schema version, in decimal"},
                    PREVIOUS_POSITION_HEADER: {
                        "type": "string",
                        "description": "position of the event published before this one on the same partition"
                        " (0 for the first), in decimal: a consumer that applied less has missed events",
                    },
                },
            },
            "payload": {
                "allOf": [
                    {"$ref": "#/components/schemas/IntegrationEvent"},
                    {
                        "type": "object",
                        "properties": {
                            "type": {"const": event_type.name},
                            "schema_version": {"const": event_type.schema_version},
                            "payload": {"$ref": f"#/components/schemas/{payload_name}"},
                        },
                    },
                ]
            },
        }
        channel = channels.setdefault(
            event_type.topic.replace(".", "_"),
            {"address": event_type.topic, "description": "keyed by aggregate id", "messages": {}},
        )
        channel["messages"][message_name] = {"$ref": f"#/components/messages/{message_name}"}
    for channel_id, channel in channels.items():
        operations[f"publish_{channel_id}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{name}"} for name in channel["messages"]],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Kabinet integration events", "version": version},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
