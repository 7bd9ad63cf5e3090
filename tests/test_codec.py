import warnings
from datetime import UTC, datetime
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, ConfigDict, field_validator
from typing_extensions import TypedDict

from amqpkit import BytesCodec, Codec, DecodeError, InvalidMessage, JsonCodec, PydanticCodec, TextCodec, codec_for
from amqpkit.codec import AutoCodec, encode_body


class Order(BaseModel):
    id: int
    item: str


def test_codecs_satisfy_the_protocol() -> None:
    codecs: tuple[Codec[Any], ...] = (
        BytesCodec(),
        TextCodec(),
        JsonCodec(),
        PydanticCodec(Order),
        AutoCodec(),
        AutoCodec(Order),
    )
    for codec in codecs:
        assert isinstance(codec, Codec)


@pytest.mark.parametrize(
    ("codec", "value"),
    [
        (BytesCodec(), b"\x00\xffraw"),
        (TextCodec(), "héllo wörld"),
        (JsonCodec(), {"a": [1, 2.5, None, True], "b": "ü"}),
        (PydanticCodec(Order), Order(id=1, item="book")),
        (PydanticCodec(list[int]), [1, 2, 3]),
    ],
)
def test_round_trip(codec: Codec[Any], value: Any) -> None:
    body = codec.encode(value)
    assert isinstance(body, bytes)
    assert codec.decode(body, codec.content_type) == value


def test_missing_content_type_is_read_by_the_codec() -> None:
    assert TextCodec().decode(b"hello", None) == "hello"
    assert JsonCodec().decode(b"[1]", "") == [1]


def test_content_type_parameters_are_ignored() -> None:
    assert TextCodec().decode(b"x", "text/plain; charset=utf-8") == "x"
    assert JsonCodec().decode(b"1", "Application/JSON") == 1


@pytest.mark.parametrize("codec", [TextCodec(), JsonCodec(), PydanticCodec(Order)])
def test_pickle_is_refused(codec: Codec[Any]) -> None:
    with pytest.raises(DecodeError, match="python-pickle"):
        codec.decode(b"\x80\x04K\x01.", "application/python-pickle")


def test_invalid_utf8() -> None:
    with pytest.raises(DecodeError, match="UTF-8"):
        TextCodec().decode(b"\xff\xfe", "text/plain")


def test_malformed_json() -> None:
    with pytest.raises(DecodeError, match="not valid JSON"):
        JsonCodec().decode(b"{nope", "application/json")


def test_empty_body_is_not_json() -> None:
    with pytest.raises(DecodeError):
        JsonCodec().decode(b"", "application/json")
    with pytest.raises(DecodeError):
        PydanticCodec(Order).decode(b"", None)


def test_schema_violation_carries_pydantic_errors() -> None:
    with pytest.raises(DecodeError) as info:
        PydanticCodec(Order).decode(b'{"id": "x"}', "application/json")
    locs = {tuple(e["loc"]) for e in info.value.errors}
    assert locs == {("id",), ("item",)}
    assert "Order" in str(info.value)


def test_encode_type_errors() -> None:
    with pytest.raises(TypeError):
        TextCodec().encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BytesCodec().encode("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (bytes, "BytesCodec()"),
        (str, "AutoCodec(str)"),
        (dict, "AutoCodec(dict)"),
        (Any, "AutoCodec(Any)"),
        (None, "AutoCodec(Any)"),
        (Order, "AutoCodec(Order)"),
    ],
)
def test_codec_for_annotation(annotation: Any, expected: str) -> None:
    codec = codec_for(annotation)
    assert isinstance(codec, Codec)
    assert repr(codec) == expected


# The rule without a codec: decode by content type, then validate against the annotation.
# (annotation, content type, body, value)
READS = [
    # JSON, whatever the annotation
    (str, "application/json", b'"hi"', "hi"),
    (int, "application/json", b"42", 42),
    (float, "application/json", b"2", 2.0),
    (dict, "application/json; charset=utf-8", b'{"a":1}', {"a": 1}),
    (list, "application/json", b"[1,2]", [1, 2]),
    (Order, "application/json", b'{"id":1,"item":"x"}', Order(id=1, item="x")),
    (type(None), "application/json", b"null", None),
    (Any, "application/vnd.example+json", b"[true]", [True]),
    # text, validated as the annotation
    (str, "text/plain; charset=utf-8", "héllo".encode(), "héllo"),
    (Any, "text/plain", b"x", "x"),
    (int, "text/plain", b"42", 42),
    (float, "Text/Plain", b"2.5", 2.5),
    # raw bytes
    (bytes, "application/octet-stream", b"\x00\xff", b"\x00\xff"),
    (Any, "application/octet-stream", b"\x00\xff", b"\x00\xff"),
    (str, "application/octet-stream", b"ok", "ok"),
    # bytes is the body as it is, whatever it is labelled
    (bytes, "application/json", b'"x"', b'"x"'),
    (bytes, "application/python-pickle", b"\x80\x04K\x01.", b"\x80\x04K\x01."),
    # no content type: the annotation's own format (the official tutorials send none)
    (str, None, b"30", "30"),
    (int, None, b"30", 30),
    (bytes, None, b"30", b"30"),
    (Any, None, b'{"a":1}', {"a": 1}),
    (Order, "", b'{"id":1,"item":"x"}', Order(id=1, item="x")),
]


@pytest.mark.parametrize(("annotation", "content_type", "body", "value"), READS)
def test_default_reads_by_content_type(annotation: Any, content_type: str | None, body: bytes, value: Any) -> None:
    got = codec_for(annotation).decode(body, content_type)
    assert got == value
    assert type(got) is type(value)


# Each of these is a DecodeError that names what went wrong.
REFUSED = [
    (str, "application/json", b'{"a":1}', "does not match str"),
    (int, "application/json", b'"x"', "does not match int"),
    (dict, "application/json", b"[1]", "does not match dict"),
    (Order, "application/json", b'{"id":"x"}', "does not match Order"),
    (Order, "text/plain", b'{"id":1,"item":"x"}', "does not match Order"),
    (int, "text/plain", b"forty-two", "does not match int"),
    (dict, "application/octet-stream", b"{}", "does not match dict"),
    (type(None), "text/plain", b"", "does not match NoneType"),
    (Any, "application/json", b"{nope", "not valid JSON"),
    (int, "application/json", b"", "not valid JSON"),
    (str, "text/plain", b"\xff\xfe", "UTF-8"),
    (str, None, b"\xff\xfe", "UTF-8"),
    (str, "application/python-pickle", b"\x80\x04K\x01.", "python-pickle"),
    (Order, "application/xml", b"<order/>", "application/xml"),
]


@pytest.mark.parametrize(("annotation", "content_type", "body", "match"), REFUSED)
def test_default_refuses_with_a_decode_error(
    annotation: Any, content_type: str | None, body: bytes, match: str
) -> None:
    with pytest.raises(DecodeError, match=match):
        codec_for(annotation).decode(body, content_type)


def test_a_decode_error_does_not_carry_the_body() -> None:
    body = b'"' + b"secret " * 2000 + b'"'
    for annotation, content_type in [(int, "application/json"), (Order, "text/plain"), (dict, None)]:
        with pytest.raises(DecodeError) as info:
            codec_for(annotation).decode(body, content_type)
        assert "secret" not in str(info.value)
        assert all("input" not in e for e in info.value.errors)


def test_default_validation_errors_carry_pydantic_errors() -> None:
    with pytest.raises(DecodeError) as info:
        codec_for(Order).decode(b'{"id": "x"}', "application/json")
    assert {tuple(e["loc"]) for e in info.value.errors} == {("id",), ("item",)}


@pytest.mark.parametrize(
    ("value", "content_type"),
    [
        ("hi", "application/json"),
        (b"\x00\xff", "application/octet-stream"),
        (bytearray(b"ab"), "application/octet-stream"),
        ({"a": 1}, "application/json"),
        ([1], "application/json"),
        (1, "application/json"),
        (2.5, "application/json"),
        (Order(id=1, item="x"), "application/json"),
        (None, "application/json"),
    ],
)
def test_default_sender_writes_bytes_raw_and_the_rest_as_json(value: Any, content_type: str) -> None:
    body, written = encode_body(AutoCodec(), value)
    assert written == content_type
    if isinstance(value, bytes | bytearray):
        assert body == bytes(value)
    else:
        assert body == JsonCodec().encode(value)


def test_annotation_codecs_write_their_own_format() -> None:
    """What an RpcServer replies with for a return annotation: unchanged, so the tutorials' clients read it."""
    assert encode_body(codec_for(str), "55") == (b"55", "text/plain; charset=utf-8")
    assert encode_body(codec_for(int), 55) == (b"55", "application/json")
    assert encode_body(codec_for(bytes), b"\x00") == (b"\x00", "application/octet-stream")
    assert encode_body(codec_for(Order), Order(id=1, item="x")) == (b'{"id":1,"item":"x"}', "application/json")


@pytest.mark.parametrize(
    ("codec", "value", "written"),
    [
        (JsonCodec(), "hi", (b'"hi"', "application/json")),
        (TextCodec(), "hi", (b"hi", "text/plain; charset=utf-8")),
        (BytesCodec(), b"hi", (b"hi", "application/octet-stream")),
        (PydanticCodec(int), 1, (b"1", "application/json")),
    ],
)
def test_explicit_codecs_write_as_before(codec: Codec[Any], value: Any, written: tuple[bytes, str]) -> None:
    assert encode_body(codec, value) == written


@pytest.mark.parametrize(
    ("codec", "content_type"),
    [
        (TextCodec(), "application/json"),
        (JsonCodec(), "text/plain"),
        (JsonCodec(), "application/octet-stream"),
        (PydanticCodec(Order), "text/plain"),
    ],
)
def test_explicit_codecs_stay_strict(codec: Codec[Any], content_type: str) -> None:
    with pytest.raises(DecodeError, match="does not accept content type"):
        codec.decode(b'"x"', content_type)


def test_no_pickle_anywhere() -> None:
    import pathlib

    import amqpkit

    root = pathlib.Path(amqpkit.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.loads" not in text, path


def test_codec_for_builds_each_annotation_once() -> None:
    # Building one costs 30-150 µs (pydantic TypeAdapters); an RPC call with returns= asks per reply.
    assert codec_for(dict[str, int]) is codec_for(dict[str, int])
    assert codec_for(list[int]) is not codec_for(list[str])
    unhashable = Annotated[int, {"not": "hashable"}]
    assert codec_for(unhashable).decode(b"3", "application/json") == 3


class _Named(BaseModel):
    name: str


def _nested(depth: int) -> list[Any]:
    outer: list[Any] = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


@pytest.mark.parametrize(
    ("codec", "value"),
    [
        (JsonCodec(), {"name": "a\ud800"}),
        (PydanticCodec(_Named), _Named(name="a\ud800")),
        (AutoCodec(_Named), _Named(name="a\ud800")),
        (TextCodec(), "a\ud800"),
        (JsonCodec(), _nested(5000)),
    ],
    ids=["json-lone-surrogate", "model-lone-surrogate", "auto-lone-surrogate", "text-lone-surrogate", "json-deep"],
)
def test_a_value_a_codec_cannot_write_is_invalid_message(codec: Any, value: Any) -> None:
    """A lone surrogate (valid in JSON that a client sent) has no UTF-8, and a value nested past Python's limit
    cannot be written: each raised the codec's own UnicodeEncodeError, PydanticSerializationError or
    RecursionError, past handlers of amqpkit's errors (the shop's gateway answered 500). Now InvalidMessage,
    still a ValueError."""
    with pytest.raises(InvalidMessage, match="cannot be encoded") as refused:
        codec.encode(value)
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize(
    ("codec", "value"),
    [
        (JsonCodec(), b"\xff\xfe"),
        (PydanticCodec(Order), {"id": "x", "item": "book"}),
        (PydanticCodec(Order), 5),
        (AutoCodec(Order), {"item": "book"}),
        (PydanticCodec(list[int]), ["x"]),
    ],
    ids=["json-bytes-not-utf8", "model-field-wrong", "model-not-a-model", "auto-field-missing", "list-item-wrong"],
)
def test_a_value_not_of_the_codecs_type_is_invalid_message(codec: Any, value: Any) -> None:
    """Bytes that are not UTF-8 raised a bare UnicodeDecodeError from JsonCodec; a value that is not of a
    PydanticCodec's type was written anyway, with only pydantic's UserWarning, for every consumer to fail to
    decode (and dead-letter) later. Refused before anything is sent now, naming the type and the fields."""
    with pytest.raises(InvalidMessage) as refused:
        codec.encode(value)
    assert isinstance(refused.value, ValueError)
    if not isinstance(value, bytes):
        assert _type_name_in(refused.value, codec.type)


def _type_name_in(error: BaseException, type_: Any) -> bool:
    return getattr(type_, "__name__", repr(type_)) in str(error) or repr(type_) in str(error)


class _Shape(TypedDict):
    sides: int


class _Exclaimed(BaseModel):
    name: str

    @field_validator("name")
    @classmethod
    def exclaim(cls, value: str) -> str:
        return value + "!"


class _StrictStamp(BaseModel):
    model_config = ConfigDict(strict=True)
    at: datetime


@pytest.mark.parametrize(
    ("codec", "value", "read"),
    [
        (PydanticCodec(Order), {"id": "7", "item": "book"}, Order(id=7, item="book")),
        (PydanticCodec(list[int]), (1, "2"), [1, 2]),
        (AutoCodec(int), "5", 5),
        (PydanticCodec(_Shape), {"sides": 3}, {"sides": 3}),
        (AutoCodec(_Shape), {"sides": 3}, {"sides": 3}),
        (PydanticCodec(Any), {"a": [1]}, {"a": [1]}),
        (
            PydanticCodec(_StrictStamp),
            {"at": "2024-01-01T00:00:00Z"},
            _StrictStamp(at=datetime(2024, 1, 1, tzinfo=UTC)),
        ),
    ],
    ids=[
        "model-from-a-dict",
        "list-from-a-tuple",
        "int-from-text",
        "typeddict",
        "auto-typeddict",
        "any",
        "strict-model-from-json-text",
    ],
)
def test_a_value_a_consumer_would_read_as_the_codecs_type_is_written(codec: Any, value: Any, read: Any) -> None:
    # Written so that the consumer's decode reads what was meant, without a warning; a TypedDict or Any raised
    # TypeError here once.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        body = codec.encode(value)
    assert codec.decode(body, "application/json") == read


class _Versioned(BaseModel):
    name: str
    version: int = 2


@pytest.mark.parametrize(
    ("model", "value"),
    [
        (_Versioned, {"name": "a"}),
        (_Versioned, {"name": "a", "password": "hunter2"}),
        (_Exclaimed, {"name": "bob"}),
        (Order, {"id": "7", "item": "book"}),
    ],
    ids=["defaults-in", "unknown-keys-out", "validators-as-for-an-instance", "coerced"],
)
def test_a_dict_for_a_model_is_written_as_the_model_would_be(model: type[BaseModel], value: dict[str, Any]) -> None:
    # The same body a model built from the dict gives: a consumer that is not pydantic (or an older model) sees
    # the defaults, and keys the model does not have (a password the model leaves out) are not sent.
    codec: PydanticCodec[Any] = PydanticCodec(model)
    assert codec.encode(value) == codec.encode(model.model_validate(value))
    assert b"hunter2" not in codec.encode(value)
