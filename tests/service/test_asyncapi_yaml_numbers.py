"""`amqpkit asyncapi --yaml`: a number written as `1e-05` (JSON's spelling) is a string to a YAML 1.1 reader.

Found by a hunt: `to_yaml` writes each number as `json.dumps` does. JSON writes small and large floats
in exponent form without a dot (`1e-05`, `1e+20`), which YAML 1.1 (PyYAML, the reader this suite uses for
every YAML check) reads as a *string*: a model with `Field(gt=1e-05)` or a default of `1e-06` gives a YAML
document whose `exclusiveMinimum` is `"1e-05"`, and that document no longer validates against AsyncAPI's
own schema (`exclusiveMinimum` must be a number). The JSON output of the same document validates.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, Field

from amqpkit import BrokerSettings
from amqpkit.asyncapi import asyncapi_document, to_yaml
from amqpkit.service import Service


class Reading(BaseModel):
    value: float = Field(gt=1e-05)
    tolerance: float = 1e-06


@pytest.mark.parametrize("number", [1e-05, 1e-06, 1e20])
def test_a_float_in_exponent_form_reads_back_as_a_number(number: float) -> None:
    assert yaml.safe_load(to_yaml({"n": number})) == {"n": number}


def test_a_yaml_document_with_a_small_bound_validates(asyncapi_schema: dict[str, Any]) -> None:
    svc = Service("sensors")

    @svc.worker("readings")
    async def store(reading: Reading) -> None: ...

    doc = asyncapi_document(svc, BrokerSettings(url="amqp://broker:5672/"))
    jsonschema.Draft7Validator(asyncapi_schema).validate(doc)  # as JSON: valid
    read = yaml.safe_load(to_yaml(doc))
    assert read["components"]["schemas"]["Reading"]["properties"]["value"]["exclusiveMinimum"] == 1e-05
    jsonschema.Draft7Validator(asyncapi_schema).validate(read)


@pytest.mark.parametrize("text", ["a\x7fb", "a\x80b", "a\x85b", "a\x9fb", "a\ud800b", "\ufeffa", "é€ and 𝄞"])
def test_a_string_with_characters_yaml_does_not_allow_reads_back_the_same(text: str) -> None:
    """Written raw in a double-quoted string (as JSON does), DEL, the C1 controls (NEL among them) and a lone
    surrogate are not allowed in a YAML stream: PyYAML refused the document, and a lone surrogate could not be
    written as UTF-8 at all. Printable characters stay as they are."""
    written = to_yaml({"description": text})
    assert yaml.safe_load(written) == {"description": text}
    if text.isprintable():
        assert text in written
