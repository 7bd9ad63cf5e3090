import pytest

from amqpkit import topic_matches
from amqpkit.patterns.routing import check_routing_key

TABLE = [
    # pattern, key, matches
    ("*.orange.*", "quick.orange.rabbit", True),
    ("*.orange.*", "quick.orange", False),
    ("*.orange.*", "quick.orange.male.rabbit", False),
    ("*.*.rabbit", "lazy.orange.rabbit", True),
    ("*.*.rabbit", "rabbit", False),
    ("lazy.#", "lazy", True),
    ("lazy.#", "lazy.pink.rabbit", True),
    ("lazy.#", "lazy.orange.male.rabbit", True),
    ("lazy.#", "lazier", False),
    ("#.rabbit", "rabbit", True),
    ("#.rabbit", "a.b.rabbit", True),
    ("#.rabbit", "a.b.rabbit.c", False),
    ("a.#.z", "a.z", True),
    ("a.#.z", "a.b.c.z", True),
    ("a.*.z", "a.z", False),
    ("a.*.z", "a.b.z", True),
    ("#", "", True),
    ("#", "anything.at.all", True),
    ("*", "", False),
    ("*", "one", True),
    ("*", "one.two", False),
    ("", "", True),
    ("", "x", False),
    ("#.#", "a", True),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), TABLE)
def test_topic_matches(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_routing_key_length() -> None:
    assert check_routing_key("a" * 255) == "a" * 255
    with pytest.raises(ValueError, match="255"):
        check_routing_key("é" * 128)
