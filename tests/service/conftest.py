from __future__ import annotations

from typing import Any

import pytest

from .asyncapi_schema import asyncapi_3_schema


@pytest.fixture(scope="session")
def asyncapi_schema() -> dict[str, Any]:
    """The official AsyncAPI 3.0.0 JSON Schema (npm @asyncapi/specs), fetched once into a cache outside the repo."""
    return asyncapi_3_schema()
