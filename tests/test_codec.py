from typing import Any

import pytest
from pydantic import BaseModel

from amqpkit import BytesCodec, Codec, DecodeError, JsonCodec, PydanticCodec, TextCodec, codec_for


class Order(BaseModel):
    id: int
    item: str


def test_codecs_satisfy_the_protocol() -> None:
    for codec in (BytesCodec(), TextCodec(), JsonCodec(), PydanticCodec(Order)):
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
    [(bytes, BytesCodec), (str, TextCodec), (dict, JsonCodec), (Any, JsonCodec), (Order, PydanticCodec)],
)
def test_codec_for_annotation(annotation: Any, expected: type) -> None:
    assert isinstance(codec_for(annotation), expected)


def test_no_pickle_anywhere() -> None:
    import pathlib

    import amqpkit

    root = pathlib.Path(amqpkit.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.loads" not in text, path
