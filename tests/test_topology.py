import pytest

from amqpkit import Binding, DeadLetterStrategy, Exchange, ExchangeType, Overflow, Queue, QueueType


def test_queue_arguments() -> None:
    q = Queue(
        "jobs",
        type=QueueType.QUORUM,
        message_ttl=1.5,
        max_length=100,
        overflow=Overflow.REJECT_PUBLISH,
        dead_letter_exchange="dlx",
        dead_letter_routing_key="jobs.dead",
        delivery_limit=5,
        dead_letter_strategy=DeadLetterStrategy.AT_LEAST_ONCE,
    )
    assert q.declare_arguments() == {
        "x-queue-type": "quorum",
        "x-message-ttl": 1500,
        "x-max-length": 100,
        "x-overflow": "reject-publish",
        "x-dead-letter-exchange": "dlx",
        "x-dead-letter-routing-key": "jobs.dead",
        "x-delivery-limit": 5,
        "x-dead-letter-strategy": "at-least-once",
    }


def test_at_least_once_sets_reject_publish() -> None:
    q = Queue("q", type="quorum", dead_letter_exchange="d", dead_letter_strategy="at-least-once")
    assert q.declare_arguments()["x-overflow"] == "reject-publish"


def test_strings_become_enums() -> None:
    q = Queue("q", type="quorum", overflow="drop-head")
    assert q.type is QueueType.QUORUM
    assert q.overflow is Overflow.DROP_HEAD
    assert Exchange("x", type="topic").type is ExchangeType.TOPIC


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": "quorum", "exclusive": True}, "cannot be exclusive"),
        ({"type": "quorum", "durable": False}, "must be durable"),
        ({"type": "stream", "auto_delete": True}, "cannot be auto-delete"),
        ({"delivery_limit": 3}, "needs a quorum queue"),
        ({"dead_letter_strategy": "at-least-once"}, "needs a quorum queue"),
        ({"message_ttl": -1}, "message_ttl must be a number of seconds, 0 or more"),
    ],
)
def test_invalid_queue_specs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Queue("q", **kwargs)  # type: ignore[arg-type]


def test_quorum_needs_a_name() -> None:
    with pytest.raises(ValueError, match="need a name"):
        Queue("", type="quorum")


def test_specs_are_frozen() -> None:
    q = Queue("q")
    with pytest.raises(AttributeError):
        q.name = "other"  # type: ignore[misc]


def test_named_queues_compare_by_value_server_named_by_identity() -> None:
    assert Queue("a") == Queue("a")
    assert Queue("a") != Queue("a", durable=False)
    anon = Queue(exclusive=True)
    assert anon == anon
    assert anon != Queue(exclusive=True)
    assert len({Queue("a"), Queue("a")}) == 1


def test_reserved_exchange_names() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Exchange("amq.mine")
    assert Exchange("amq.topic", type="topic").is_builtin


def test_header_binding() -> None:
    ex = Exchange("h", type="headers")
    b = Binding(ex, Queue("q"), headers={"format": "pdf"}, match="any")
    assert b.bind_arguments() == {"x-match": "any", "format": "pdf"}
    with pytest.raises(ValueError, match="headers exchange"):
        Binding(Exchange("d"), Queue("q"), headers={"a": 1})
    with pytest.raises(ValueError, match="all' or 'any"):
        Binding(ex, Queue("q"), headers={}, match="some")
