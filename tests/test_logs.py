import io
import json
import logging

import pytest

from amqpkit.logs import configure_logging
from amqpkit.patterns.work_queue import RetryPolicy, _delay_bucket


def test_json_lines() -> None:
    stream = io.StringIO()
    configure_logging(json_lines=True, stream=stream)
    try:
        logging.getLogger("amqpkit.test").warning("task %s failed", "t1")
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("amqpkit.test").exception("with error")
    finally:
        logging.getLogger().handlers.clear()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "warning"
    assert first["logger"] == "amqpkit.test"
    assert first["message"] == "task t1 failed"
    assert first["time"].endswith("+00:00")
    assert second["error"] == "ValueError: bad"


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(initial_delay=1, multiplier=2, max_delay=5, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    jittered = RetryPolicy(initial_delay=1, jitter=0.1)
    assert all(0.9 <= jittered.delay(1) <= 1.1 for _ in range(100))


def test_delay_buckets_keep_two_significant_digits() -> None:
    assert _delay_bucket(0.0004) == 1
    assert _delay_bucket(0.05) == 50
    assert _delay_bucket(1.234) == 1200
    assert _delay_bucket(1.26) == 1300
    assert _delay_bucket(123.4) == 120_000
    # a jittered 1 s delay lands in one of a handful of queues
    assert len({_delay_bucket(RetryPolicy(jitter=0.1).delay(1)) for _ in range(500)}) <= 21


@pytest.mark.parametrize(
    "policy",
    [RetryPolicy(), RetryPolicy(jitter=0), RetryPolicy(initial_delay=0.05, multiplier=3, max_delay=20, jitter=0.5)],
    ids=["default", "no-jitter", "wide"],
)
def test_the_delay_queues_a_policy_can_use_are_all_known(policy: RetryPolicy) -> None:
    """A worker renews, from its start, the delay queues its policy can use (WorkQueue.adopt_delay_queues):
    every delay the policy draws falls into one of them."""
    buckets = policy.delay_buckets()
    assert buckets == sorted(set(buckets))
    drawn = {_delay_bucket(policy.delay(n)) for n in range(1, policy.max_attempts) for _ in range(2000)}
    assert drawn <= set(buckets), sorted(drawn - set(buckets))
    assert RetryPolicy(max_attempts=3, initial_delay=2, jitter=0).delay_buckets() == [2000, 4000]
    assert len(RetryPolicy().delay_buckets()) == 43  # 1, 2, 4 and 8 s, each give or take 10 %


def test_a_policy_of_many_attempts_has_its_delays_and_buckets_at_once() -> None:
    """A review: max_attempts=2000 overflowed a float (2.0**1999) at each worker start, and 2,000,000 attempts
    with a multiplier of 1 took 20 s of the event loop; delay() overflowed past about attempt 1,000."""
    forever = RetryPolicy(max_attempts=2_000_000, multiplier=1.0, jitter=0)
    assert forever.delay_buckets() == [1000]
    many = RetryPolicy(max_attempts=2000, max_delay=300, jitter=0)
    assert many.delay_buckets()[-1] == 300_000 and many.delay(1999) == 300
    assert RetryPolicy(initial_delay=1, multiplier=2, max_delay=5, jitter=0).delay(3) == 4
