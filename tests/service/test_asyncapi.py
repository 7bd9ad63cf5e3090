"""`amqpkit asyncapi` writes an AsyncAPI 3.0.0 document that validates against the official schema."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from amqpkit import BrokerSettings, Delivery, Exchange, JsonCodec, Queue
from amqpkit.asyncapi import asyncapi_document, to_yaml
from amqpkit.service import Service, ServiceContext
from examples import billing

ROOT = Path(__file__).resolve().parents[2]


def validate(doc: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(schema).validate(doc)
    for ref in refs(doc):
        assert ref.startswith("#/"), ref
        resolve(doc, ref)  # every reference points into the document


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref}: no {part!r}"
        node = node[part]
    return node


async def amqpkit(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amqpkit.cli", *args, cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_example_validates_as_json_and_as_yaml(asyncapi_schema: dict[str, Any], tmp_path: Path) -> None:
    url = "amqps://shop-user:s3cret-Pw@rabbit.example:5671/shop"
    code, out, err = await amqpkit("asyncapi", "examples.billing:service", env={"AMQP_URL": url})
    assert code == 0, err
    doc = json.loads(out)
    validate(doc, asyncapi_schema)
    assert "s3cret-Pw" not in out and "shop-user" not in out  # neither password nor user is written
    assert doc["servers"]["rabbitmq"] | {"security": None} == {
        "host": "rabbit.example:5671", "protocol": "amqps", "protocolVersion": "0.9.1", "pathname": "/shop",
        "description": "RabbitMQ, vhost 'shop'", "security": None,
    }  # fmt: skip

    ops = doc["operations"]
    assert ops["on_order_placed"]["action"] == "receive"
    assert ops["issue_invoice"]["x-amqpkit-work-queue"]["deadLetterQueue"] == "billing.invoices.dlq"
    assert ops["shop.invoices.invoice.created"]["action"] == "send"
    quote = ops["billing.rpc.quote"]
    assert quote["reply"]["address"]["location"] == "$message.header#/replyTo"
    request = resolve(doc, resolve(doc, quote["messages"][0]["$ref"])["$ref"])
    assert request["bindings"]["amqp"]["messageType"] == "quote"
    assert request["contentType"] == "application/json"
    assert set(resolve(doc, request["payload"]["$ref"])["properties"]) == {"total", "country"}
    order = resolve(doc, "#/components/messages/OrderPlaced")
    schema = resolve(doc, order["payload"]["$ref"])
    assert set(schema["properties"]) == {"order_id", "customer", "total", "country"}
    assert schema["properties"]["total"]["minimum"] == 0  # Field(ge=0) reaches the document

    written = tmp_path / "billing.yaml"
    # The in-process document's default server, whatever AMQP_URL says (CI points it at a 4.x node).
    local = {"AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/"}
    code, out, err = await amqpkit("asyncapi", "examples.billing:service", "--yaml", "-o", str(written), env=local)
    assert code == 0, err
    assert out == ""
    from_yaml = yaml.safe_load(written.read_text())
    assert from_yaml == asyncapi_document(billing.service)
    validate(from_yaml, asyncapi_schema)


def test_a_service_with_no_handlers_is_a_valid_document(asyncapi_schema: dict[str, Any]) -> None:
    doc = asyncapi_document(Service("empty"))
    validate(doc, asyncapi_schema)
    assert doc["channels"] == {} and doc["operations"] == {}
    # The check has teeth: a wrong version, or a wrong AMQP binding deep inside, is refused.
    with pytest.raises(jsonschema.ValidationError):
        validate({**doc, "asyncapi": "2.6.0"}, asyncapi_schema)
    channel = {"address": "q", "bindings": {"amqp": {"is": "queue", "exchange": {"name": "x"}}}}
    with pytest.raises(jsonschema.ValidationError):
        validate({**doc, "channels": {"c": channel}}, asyncapi_schema)


class Reading(BaseModel):
    sensor: str
    value: float


def test_every_kind_of_handler_and_binding_validates(asyncapi_schema: dict[str, Any]) -> None:
    svc = Service("everything", description="one of each")
    alerts = Exchange("alerts", type="headers")
    fanout = Exchange("broadcast", type="fanout")
    svc.publisher(fanout, Reading, persistent=False)
    svc.publisher("", bytes, routing_key="raw.queue", name="raw")

    @svc.subscriber(Exchange("readings", type="topic"), binding_keys=["*.temp", "#.alarm"])
    async def private(reading: Delivery[Reading], ctx: ServiceContext) -> None:
        """Every reading, in a queue of this instance's own."""

    @svc.subscriber(alerts, headers={"level": "high", "site": "x"}, match="any", queue="alerts.q")
    def on_alert(body: bytes) -> None: ...

    @svc.subscriber(fanout, queue=Queue("fan.q", max_length=10, message_ttl=60), codec=JsonCodec())
    async def fan(doc: dict[str, int]) -> None: ...

    @svc.worker("jobs")
    def job(text: str) -> None: ...

    @svc.rpc("calc", "add")
    async def add(numbers: list[int]) -> int:
        return sum(numbers)

    @svc.rpc("calc")
    async def nothing(request: Reading) -> None: ...

    doc = asyncapi_document(svc, BrokerSettings(url=["amqp://a:1/", "amqp://b:2/v%2Fh"]))
    validate(doc, asyncapi_schema)
    assert set(doc["servers"]) == {"rabbitmq-1", "rabbitmq-2"}
    assert doc["channels"]["alerts"]["x-amqpkit-headers"] == {"match": "any", "headers": {"level": "high", "site": "x"}}
    assert doc["channels"]["readings.star.temp"]["address"] == "*.temp"
    assert doc["channels"]["readings.hash.alarm"]["address"] == "#.alarm"
    assert doc["operations"]["private"]["x-amqpkit-queue"]["private"] is True
    assert doc["operations"]["private.2"]["channel"] == {"$ref": "#/channels/readings.hash.alarm"}
    raw = resolve(doc, "#/components/messages/bytes")
    assert raw["contentType"] == "application/octet-stream"
    assert resolve(doc, "#/components/messages/str")["contentType"].startswith("text/plain")
    assert doc["operations"]["broadcast"]["bindings"]["amqp"]["deliveryMode"] == 1
    assert yaml.safe_load(to_yaml(doc)) == doc


@pytest.mark.parametrize("value", [{"a": [], "b": {}, "c": [{"d": 1, "e": [1, [2, 3]]}]}, [], {}, "x: y\n#z", None])
def test_yaml_reads_back_as_written(value: Any) -> None:
    assert yaml.safe_load(to_yaml(value)) == value
