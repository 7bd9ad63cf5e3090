import pytest
from pydantic import ValidationError

from amqpkit import BrokerSettings, redact_url


def test_repr_and_str_hide_the_password() -> None:
    s = BrokerSettings(url="amqp://u:s3cret@h/")
    assert "s3cret" not in repr(s)
    assert "s3cret" not in str(s)
    assert "u:***@h" in repr(s)


def test_validation_errors_hide_the_password() -> None:
    with pytest.raises(ValidationError) as info:
        BrokerSettings(url="http://u:s3cret@h/")
    assert "s3cret" not in str(info.value)


def test_one_or_many_urls() -> None:
    assert BrokerSettings(url="amqp://a/").urls == ("amqp://a/",)
    s = BrokerSettings(url=["amqp://a/", "amqps://b/"])
    assert s.urls == ("amqp://a/", "amqps://b/")


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://x:pw@one:5672/, amqp://x:pw@two:5672/")
    s = BrokerSettings.from_env(heartbeat=3)
    assert s.urls == ("amqp://x:pw@one:5672/", "amqp://x:pw@two:5672/")
    assert s.heartbeat == 3
    monkeypatch.delenv("AMQP_URL")
    assert BrokerSettings.from_env().urls == ("amqp://guest:guest@127.0.0.1:5672/",)


def test_frozen() -> None:
    s = BrokerSettings()
    with pytest.raises(ValidationError):
        s.heartbeat = 1


def test_defaults() -> None:
    s = BrokerSettings()
    assert s.max_message_size == 16 * 1024 * 1024
    assert s.tls is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://u:p@h:5672/v", "amqp://u:***@h:5672/v"),
        ("amqps://u@h/", "amqps://u@h/"),
        ("amqp://h", "amqp://h"),
        ("amqp://u:p@[::1]:5672/?heartbeat=5", "amqp://u:***@[::1]:5672/"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
