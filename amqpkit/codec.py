"""Codecs turn values into bodies and back, and refuse what they do not accept.

A codec names the content type it writes, and the content types it reads.
A body with no content type is read by the codec it was handed to (the
official tutorials and many clients send none); a body whose content type
the codec does not accept raises :class:`~amqpkit.DecodeError`. There is
no pickle codec, and none will be added: unpickling a body runs whatever
code its sender chose.

When no codec is given, one rule applies (:class:`AutoCodec`): the sender
writes bytes as they are (``application/octet-stream``) and every other
value as JSON; the receiver decodes by the message's content type, then
validates the result against the handler's annotation. So a value sent by
default arrives as the same type in a handler annotated with that type.
A codec passed explicitly is used exactly as it is.
"""

from __future__ import annotations

import json
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from .errors import DecodeError, InvalidMessage

__all__ = [
    "AutoCodec",
    "BytesCodec",
    "Codec",
    "JsonCodec",
    "PydanticCodec",
    "TextCodec",
    "codec_for",
    "encode_body",
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
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800", which JSON may carry in): no UTF-8 for it
            raise _unencodable("text", exc) from None

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
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=to_jsonable_python).encode()
        except (UnicodeError, RecursionError, PydanticSerializationError) as exc:  # bytes not UTF-8: no JSON string
            raise _unencodable("JSON", exc) from None

    def decode(self, body: bytes, content_type: str | None = None) -> Any:
        _check_type("JsonCodec", content_type, self.accepts)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from exc
        except RecursionError:
            # json.loads reads arrays and objects by recursion: some 1,000 levels (a 6 KB body of brackets)
            # are past Python's limit. Not JSONDecodeError, so it went past every pattern's decode-error path.
            raise DecodeError("body is JSON nested too deeply to read") from None

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
        # the values a failed write is not worth validating again: the type's own instances, when it is a class
        self._instances = _instances_of(type_)
        self._serializer = self._adapter.serializer

    def encode(self, value: M) -> bytes:
        """``value`` as JSON. A value not of the codec's type that a consumer's decode reads as one (a dict for a
        model) is written as that value of the type would be (its defaults in, keys the type does not have out);
        one it would not read is refused with :class:`~amqpkit.InvalidMessage`, before anything is sent. Written
        as it was, with only pydantic's warning, every consumer failed to read it."""
        # pydantic-core's serializer, as TypeAdapter.dump_json calls it, less its Python wrapper (a small model's
        # instance in 0.6 µs against 1.9)
        serializer = self._serializer
        if isinstance(value, self._instances):
            try:
                return serializer.to_json(value)
            except PydanticSerializationError as exc:  # of the type and still not writable: a lone surrogate
                raise _unencodable("JSON", exc) from None
        try:
            # What the type's serializer takes as it is (a list of ints, a list of the models): written. Asking
            # costs 1.5 to 4 µs more than not asking; checking every body with a decode cost twice the writing.
            return serializer.to_json(value, warnings="error")
        except PydanticSerializationError:
            pass
        try:
            checked = self._adapter.validate_json(serializer.to_json(value, warnings=False))  # as a consumer reads it
            return serializer.to_json(checked, warnings=False)
        except PydanticSerializationError as exc:
            raise _unencodable("JSON", exc) from None
        except ValidationError as invalid:
            raise _not_of_type(invalid, self.type) from None

    def decode(self, body: bytes, content_type: str | None = None) -> M:
        _check_type(repr(self), content_type, self.accepts)
        try:
            return self._adapter.validate_json(body)
        except ValidationError as exc:
            raise _invalid(exc, self.type) from exc

    def __repr__(self) -> str:
        return f"PydanticCodec({_type_name(self.type)})"


def _unencodable(what: str, exc: BaseException) -> InvalidMessage:
    """A value a codec cannot write (a lone surrogate has no UTF-8; a value nested past Python's recursion limit):
    amqpkit's typed error, raised before anything is sent; a ValueError, as the codecs' own errors were."""
    why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
    return InvalidMessage(f"the value cannot be encoded as {what}: {why}")


def _instances_of(type_: Any) -> type | tuple[type, ...]:
    """What ``isinstance`` can tell are ``type_``'s own values: the class itself, or nothing (``list[int]``; a
    TypedDict and ``typing.Any`` are classes that refuse the question)."""
    if not isinstance(type_, type):
        return ()
    try:
        isinstance(None, type_)
    except TypeError:
        return ()
    return type_


def _not_of_type(exc: ValidationError, type_: Any) -> InvalidMessage:
    """A value a PydanticCodec was asked to write that is not of its type and does not validate as one: where
    and why (never the value itself, which may hold secrets)."""
    errors = exc.errors(include_url=False, include_input=False)
    summary = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(value)'}: {err['msg']}" for err in errors[:5])
    return InvalidMessage(f"the value does not match {_type_name(type_)}: {summary}")


def _type_name(type_: Any) -> str:
    """A class by its name; anything else (``list[int]``, whose ``__name__`` is ``list``) as it is written."""
    return type_.__name__ if isinstance(type_, type) else repr(type_)


def _invalid(exc: ValidationError, type_: Any) -> DecodeError:
    """pydantic's verdict as a DecodeError: a short summary (never the body itself) and the error list."""
    errors = exc.errors(include_url=False, include_input=False)
    if any(err["type"] == "json_invalid" for err in errors):
        return DecodeError(f"body is not valid JSON: {errors[0]['msg']}", errors=list(errors))
    summary = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in errors[:5])
    return DecodeError(f"body does not match {_type_name(type_)}: {summary}", errors=list(errors))


_BYTES_LIKE = (bytes, bytearray, memoryview)
_TEXT = TextCodec()


class AutoCodec(Generic[T]):
    """The codec used when none is given: decode by content type, then validate as ``type_``.

    Reading, by the body's media type (parameters such as ``charset`` are ignored):

    - ``application/json`` and ``*/*+json``: JSON, validated as ``type_``;
    - ``text/plain``: UTF-8 text, validated as ``type_`` (so ``"42"`` reads as an ``int``);
    - ``application/octet-stream``: the bytes, validated as ``type_``;
    - no content type: ``type_``'s own format, as the tutorials expect: text for
      ``str``, JSON for everything else;
    - any other content type: :class:`~amqpkit.DecodeError`.

    ``bytes`` always reads as the body itself, whatever its content type.
    ``Any`` (or ``object``) takes the decoded value as it is. A value that
    does not validate raises :class:`~amqpkit.DecodeError` with pydantic's
    error list.

    Writing: :meth:`encode` writes ``type_``'s own format (text for ``str``,
    raw for ``bytes``, JSON otherwise) under :attr:`content_type`;
    :meth:`encode_body` also sends a bytes value as it is, under
    ``application/octet-stream``, which is what the patterns' default
    senders use.
    """

    def __init__(self, type_: Any = Any) -> None:
        self.type = type_
        self._any = type_ in (Any, object)
        self._raw = type_ is bytes
        self._json: Codec[Any] = JsonCodec() if self._any else PydanticCodec(type_)
        self._own: Codec[Any] = BytesCodec() if self._raw else TextCodec() if type_ is str else self._json
        self._adapter: TypeAdapter[Any] | None = None if self._any or self._raw else TypeAdapter(type_)
        self.content_type = self._own.content_type

    def encode(self, value: T) -> bytes:
        return self._own.encode(value)

    def encode_body(self, value: T) -> tuple[bytes, str]:
        """The body and the content type to send it with: bytes as they are, the rest as :meth:`encode` writes."""
        if isinstance(value, _BYTES_LIKE):
            return bytes(value), OCTETS
        return self._own.encode(value), self.content_type

    def decode(self, body: bytes, content_type: str | None = None) -> T:
        if self._raw:
            return cast(T, body)
        media = _media_type(content_type)
        if media is None:
            return cast(T, self._own.decode(body))
        if media == JSON or media.endswith("+json"):
            return cast(T, self._json.decode(body))
        if media == TEXT:
            text = _TEXT.decode(body)
            return cast(T, text) if self.type is str else self._validate(text, strings=True)
        if media == OCTETS:
            return self._validate(body, strings=False)
        raise DecodeError(
            f"{self!r} does not accept content type {content_type!r} (accepts {JSON}, {TEXT}, {OCTETS}, or none)"
        )

    def _validate(self, value: Any, *, strings: bool) -> T:
        if self._adapter is None:
            return cast(T, value)
        try:
            if strings:
                return cast(T, self._adapter.validate_strings(value))
            return cast(T, self._adapter.validate_python(value))
        except ValidationError as exc:
            raise _invalid(exc, self.type) from exc

    def __repr__(self) -> str:
        return f"AutoCodec({'Any' if self._any else _type_name(self.type)})"


def encode_body(codec: Codec[T], value: T) -> tuple[bytes, str]:
    """``value`` encoded by ``codec``, and the content type to send it with.

    An :class:`AutoCodec` (the default) picks the content type per value;
    any other codec writes its own :attr:`~Codec.content_type`.
    """
    if isinstance(codec, AutoCodec):
        return codec.encode_body(value)
    return codec.encode(value), codec.content_type


def codec_for(annotation: Any) -> Codec[Any]:
    """The codec a handler's parameter annotation asks for, when no codec is given.

    ``bytes`` -> :class:`BytesCodec` (the body as it is, whatever its content
    type); anything else -> an :class:`AutoCodec` for it, which decodes by
    content type and validates against the annotation. No annotation
    (``Any``, ``object``, ``None``) takes any decoded value.
    """
    if annotation is bytes:
        return BytesCodec()
    try:
        return _CODECS[annotation]
    except KeyError:
        pass
    except TypeError:  # an annotation that cannot be hashed: built each time
        return AutoCodec(Any if annotation is None else annotation)
    codec: Codec[Any] = AutoCodec(Any if annotation is None else annotation)
    if len(_CODECS) >= _CODECS_MAX:
        _CODECS.pop(next(iter(_CODECS)))  # the oldest: annotations made on the fly cannot grow it without bound
    _CODECS[annotation] = codec
    return codec


# Codecs are immutable once built, and building one costs 30-150 µs (pydantic's TypeAdapters): an RPC
# call with `returns=` asked for one per reply. Kept per annotation, oldest out past the bound.
_CODECS: dict[Any, Codec[Any]] = {}
_CODECS_MAX = 512
