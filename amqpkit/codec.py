"""Codecs turn values into bodies and back, and refuse what they do not accept.

A codec names the content type it writes, and the content types it reads.
A body with no content type is read by the codec it was handed to (the
official tutorials and many clients send none); a body whose content type
the codec does not accept raises :class:`~amqpkit.DecodeError`. There is
no pickle codec, and none will be added: unpickling a body runs whatever
code its sender chose.
"""

from __future__ import annotations

import json
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

from .errors import DecodeError

__all__ = [
    "BytesCodec",
    "Codec",
    "JsonCodec",
    "PydanticCodec",
    "TextCodec",
    "codec_for",
]

T = TypeVar("T")
M = TypeVar("M")

JSON = "application/json"
TEXT = "text/plain"
OCTETS = "application/octet-stream"


@runtime_checkable
class Codec(Protocol[T]):
    """Encodes values of one type to bytes, and decodes them back.

    ``encode`` raises ``TypeError``/``ValueError`` for a value it cannot
    encode; ``decode`` raises :class:`~amqpkit.DecodeError` for any body it
    cannot turn into a value, including one of an unaccepted content type.
    """

    content_type: str

    def encode(self, value: T) -> bytes: ...

    def decode(self, body: bytes, content_type: str | None = None) -> T: ...


def _media_type(content_type: str | None) -> str | None:
    """``text/plain; charset=utf-8`` -> ``text/plain``; empty -> None."""
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _check_type(codec: str, content_type: str | None, accepted: frozenset[str]) -> None:
    media = _media_type(content_type)
    if media is not None and media not in accepted:
        raise DecodeError(
            f"{codec} does not accept content type {content_type!r} (accepts {', '.join(sorted(accepted))})"
        )


class BytesCodec:
    """The body as it is. Accepts any content type."""

    content_type = OCTETS

    def encode(self, value: bytes) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"BytesCodec encodes bytes, not {type(value).__name__}")
        return bytes(value)

    def decode(self, body: bytes, content_type: str | None = None) -> bytes:
        return body

    def __repr__(self) -> str:
        return "BytesCodec()"


class TextCodec:
    """UTF-8 text, as the RabbitMQ tutorials send it."""

    content_type = "text/plain; charset=utf-8"
    accepts = frozenset({TEXT})

    def encode(self, value: str) -> bytes:
        if not isinstance(value, str):
            raise TypeError(f"TextCodec encodes str, not {type(value).__name__}")
        return value.encode("utf-8")

    def decode(self, body: bytes, content_type: str | None = None) -> str:
        _check_type("TextCodec", content_type, self.accepts)
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"body is not valid UTF-8: {exc}") from exc

    def __repr__(self) -> str:
        return "TextCodec()"


class JsonCodec:
    """Any JSON document, decoded as plain Python values (dict, list, str, numbers, bool, None).

    Encodes those, and also pydantic models, dataclasses, datetimes and UUIDs.
    """

    content_type = JSON
    accepts = frozenset({JSON})

    def encode(self, value: Any) -> bytes:
        # Pydantic models, dataclasses, datetimes and UUIDs encode as pydantic would encode them.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=to_jsonable_python).encode()

    def decode(self, body: bytes, content_type: str | None = None) -> Any:
        _check_type("JsonCodec", content_type, self.accepts)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from exc

    def __repr__(self) -> str:
        return "JsonCodec()"


class PydanticCodec(Generic[M]):
    """JSON validated against a type: a pydantic model, or any type pydantic can check (``list[int]``).

    A body that fails validation raises :class:`~amqpkit.DecodeError` whose
    ``errors`` are pydantic's error list.
    """

    content_type = JSON
    accepts = frozenset({JSON})

    def __init__(self, type_: type[M] | Any) -> None:
        self.type = type_
        self._adapter: TypeAdapter[M] = TypeAdapter(type_)

    def encode(self, value: M) -> bytes:
        return self._adapter.dump_json(value)

    def decode(self, body: bytes, content_type: str | None = None) -> M:
        _check_type(repr(self), content_type, self.accepts)
        try:
            return self._adapter.validate_json(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            if any(err["type"] == "json_invalid" for err in errors):
                raise DecodeError(f"body is not valid JSON: {errors[0]['msg']}", errors=list(errors)) from exc
            summary = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in errors[:5]
            )
            raise DecodeError(f"body does not match {self._name()}: {summary}", errors=list(errors)) from exc

    def _name(self) -> str:
        return getattr(self.type, "__name__", None) or repr(self.type)

    def __repr__(self) -> str:
        return f"PydanticCodec({self._name()})"


def codec_for(annotation: Any) -> Codec[Any]:
    """The codec a handler's parameter annotation asks for.

    ``bytes`` -> :class:`BytesCodec`; ``str`` -> :class:`TextCodec`;
    ``dict``/``list``/``Any``/no annotation -> :class:`JsonCodec`; a
    pydantic model or any other type -> :class:`PydanticCodec`.
    """
    if annotation is bytes:
        return BytesCodec()
    if annotation is str:
        return TextCodec()
    if annotation in (Any, dict, list, object, None):
        return JsonCodec()
    return cast(Codec[Any], PydanticCodec(annotation))
