"""The tutorials as subprocesses: exact output, clean exits, and pika on the other end."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import pika
import pytest

from amqpkit import Broker

from .tutorial_support import Script, run
from .waiting import until, wait_for

# Every script a test starts is ended when the test ends, passed or failed (a failed test once left
# RPC servers consuming rpc_queue, and later runs failed).
pytestmark = pytest.mark.usefixtures("spawned")

WAITING_MESSAGES = " [*] Waiting for messages. To exit press CTRL+C"
WAITING_LOGS = " [*] Waiting for logs. To exit press CTRL+C"


@pytest.fixture
async def tutorial_names(broker: Broker) -> AsyncIterator[None]:
    """The tutorials' fixed names: start with an empty 'hello', and remove what the run made."""
    with contextlib.suppress(Exception):  # it may not exist yet
        await broker.purge_queue("hello")
    yield
    with contextlib.suppress(Exception):
        await broker.delete_queue("hello")
    for exchange in ("logs", "direct_logs", "topic_logs"):
        with contextlib.suppress(Exception):
            await broker.delete_exchange(exchange)


async def assert_clean_exit(script: Script, sig: int = signal.SIGTERM) -> None:
    code, out, err = await script.stop(sig)
    assert code == 0, err
    assert out.strip().splitlines()[-1:] == ["Interrupted"]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "script",
    [
        "01_hello_world/send.py",
        "01_hello_world/receive.py",
        "02_work_queues/new_task.py",
        "02_work_queues/worker.py",
        "03_publish_subscribe/emit_log.py",
        "03_publish_subscribe/receive_logs.py",
        "04_routing/emit_log_direct.py",
        "04_routing/receive_logs_direct.py",
        "05_topics/emit_log_topic.py",
        "05_topics/receive_logs_topic.py",
        "06_rpc/rpc_server.py",
        "06_rpc/rpc_client.py",
        "07_publisher_confirms/publisher_confirms.py",
    ],
)
async def test_help(script: str, amqp_url: str) -> None:
    code, out, err = await run(script, "--help", url=amqp_url)
    assert code == 0, err
    assert "--url" in out
    assert out.startswith("usage:")


@pytest.mark.usefixtures("tutorial_names")
async def test_hello_world(amqp_url: str) -> None:
    receiver = await Script.start("01_hello_world/receive.py", url=amqp_url)
    assert await receiver.line() == WAITING_MESSAGES
    code, out, err = await run("01_hello_world/send.py", url=amqp_url)
    assert (code, out, err) == (0, " [x] Sent 'Hello World!'\n", "")
    assert await receiver.line() == " [x] Received b'Hello World!'"
    await assert_clean_exit(receiver, signal.SIGINT)


@pytest.mark.usefixtures("tutorial_names")
async def test_publish_subscribe_reaches_every_receiver(amqp_url: str) -> None:
    receivers = [await Script.start("03_publish_subscribe/receive_logs.py", url=amqp_url) for _ in range(2)]
    for r in receivers:
        assert await r.line() == WAITING_LOGS
    code, out, _ = await run("03_publish_subscribe/emit_log.py", url=amqp_url)
    assert (code, out) == (0, " [x] Sent info: Hello World!\n")
    code, out, _ = await run("03_publish_subscribe/emit_log.py", "warning:", "disk", "low", url=amqp_url)
    assert out == " [x] Sent warning: disk low\n"
    for r in receivers:
        assert await r.line() == " [x] b'info: Hello World!'"
        assert await r.line() == " [x] b'warning: disk low'"
        await assert_clean_exit(r)


@pytest.mark.usefixtures("tutorial_names")
async def test_routing_by_severity(amqp_url: str) -> None:
    errors = await Script.start("04_routing/receive_logs_direct.py", "error", url=amqp_url)
    everything = await Script.start("04_routing/receive_logs_direct.py", "info", "warning", "error", url=amqp_url)
    for r in (errors, everything):
        assert await r.line() == WAITING_LOGS
    for args, printed in [
        ((), " [x] Sent info:Hello World!"),
        (("warning", "low", "disk"), " [x] Sent warning:low disk"),
        (("error", "disk", "full"), " [x] Sent error:disk full"),
        (("debug", "ignored"), " [x] Sent debug:ignored"),
    ]:
        code, out, _ = await run("04_routing/emit_log_direct.py", *args, url=amqp_url)
        assert (code, out) == (0, printed + "\n")
    assert await errors.line() == " [x] error:b'disk full'"
    assert [await everything.line() for _ in range(3)] == [
        " [x] info:b'Hello World!'",
        " [x] warning:b'low disk'",
        " [x] error:b'disk full'",
    ]
    for r in (errors, everything):
        code, out, err = await r.stop()
        assert code == 0, err
        assert out == "Interrupted\n"  # nothing else arrived: debug went nowhere


async def test_routing_receiver_needs_a_severity(amqp_url: str) -> None:
    code, _, err = await run("04_routing/receive_logs_direct.py", url=amqp_url)
    assert code == 1
    assert err.startswith("Usage: ") and err.rstrip().endswith("[info] [warning] [error]")


@pytest.mark.usefixtures("tutorial_names")
async def test_topics(amqp_url: str) -> None:
    kern = await Script.start("05_topics/receive_logs_topic.py", "kern.*", url=amqp_url)
    critical = await Script.start("05_topics/receive_logs_topic.py", "*.critical", url=amqp_url)
    for r in (kern, critical):
        assert await r.line() == WAITING_LOGS
    code, out, _ = await run("05_topics/emit_log_topic.py", "kern.critical", "A critical kernel error", url=amqp_url)
    assert (code, out) == (0, " [x] Sent kern.critical:A critical kernel error\n")
    code, out, _ = await run("05_topics/emit_log_topic.py", "cron.info", "tick", url=amqp_url)
    assert out == " [x] Sent cron.info:tick\n"
    # A single word is dropped, as in the official script: key anonymous.info, default message.
    code, out, _ = await run("05_topics/emit_log_topic.py", "lonely", url=amqp_url)
    assert out == " [x] Sent anonymous.info:Hello World!\n"
    assert await kern.line() == " [x] kern.critical:b'A critical kernel error'"
    assert await critical.line() == " [x] kern.critical:b'A critical kernel error'"
    for r in (kern, critical):
        code, out, _ = await r.stop()
        assert (code, out) == (0, "Interrupted\n")


async def test_topic_receiver_needs_a_pattern(amqp_url: str) -> None:
    code, _, err = await run("05_topics/receive_logs_topic.py", url=amqp_url)
    assert code == 1
    assert err.rstrip().endswith("[binding_key]...")


# ---------------------------------------------------------------- pika, both ways


def _pika(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def pika_send_hello(url: str) -> None:
    """The official tutorial 1 sender, as written there."""
    connection = _pika(url)
    channel = connection.channel()
    channel.queue_declare(queue="hello")
    channel.basic_publish(exchange="", routing_key="hello", body="Hello World!")
    connection.close()


def pika_receive_hello(url: str, timeout: float = 10) -> bytes:
    connection = _pika(url)
    channel = connection.channel()
    channel.queue_declare(queue="hello")
    try:
        for _method, _props, body in channel.consume("hello", auto_ack=True, inactivity_timeout=timeout):
            if body is None:
                raise AssertionError("pika received nothing")
            return bytes(body)
        raise AssertionError("unreachable")
    finally:
        channel.cancel()
        connection.close()


@pytest.mark.usefixtures("tutorial_names")
async def test_pika_sender_to_our_receiver(amqp_url: str) -> None:
    receiver = await Script.start("01_hello_world/receive.py", url=amqp_url)
    assert await receiver.line() == WAITING_MESSAGES
    await asyncio.to_thread(pika_send_hello, amqp_url)
    assert await receiver.line() == " [x] Received b'Hello World!'"
    await assert_clean_exit(receiver)


@pytest.mark.usefixtures("tutorial_names")
async def test_our_sender_to_pika_receiver(amqp_url: str) -> None:
    # pika then declares 'hello' as the official receiver does: our declaration must be the same.
    code, _, err = await run("01_hello_world/send.py", url=amqp_url)
    assert code == 0, err
    assert await asyncio.to_thread(pika_receive_hello, amqp_url) == b"Hello World!"


@pytest.mark.usefixtures("tutorial_names")
async def test_pika_topic_emitter_to_our_receiver(amqp_url: str) -> None:
    receiver = await Script.start("05_topics/receive_logs_topic.py", "#.critical", url=amqp_url)
    assert await receiver.line() == WAITING_LOGS

    def emit() -> None:
        connection = _pika(amqp_url)
        channel = connection.channel()
        channel.exchange_declare(exchange="topic_logs", exchange_type="topic")
        channel.basic_publish(exchange="topic_logs", routing_key="db.disk.critical", body="full")
        connection.close()

    await asyncio.to_thread(emit)
    assert await receiver.line() == " [x] db.disk.critical:b'full'"
    await assert_clean_exit(receiver)


@pytest.mark.usefixtures("tutorial_names")
async def test_our_topic_emitter_to_pika_receiver(amqp_url: str) -> None:
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()

    def receive() -> tuple[str, bytes]:
        connection = _pika(amqp_url)
        channel = connection.channel()
        channel.exchange_declare(exchange="topic_logs", exchange_type="topic")
        queue = channel.queue_declare(queue="", exclusive=True).method.queue
        channel.queue_bind(exchange="topic_logs", queue=queue, routing_key="kern.*")
        loop.call_soon_threadsafe(ready.set)
        try:
            for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=15):
                if body is None:
                    raise AssertionError("pika received nothing")
                return method.routing_key, bytes(body)
            raise AssertionError("unreachable")
        finally:
            channel.cancel()
            connection.close()

    receiving = asyncio.ensure_future(asyncio.to_thread(receive))
    await asyncio.wait_for(ready.wait(), 15)
    code, out, _ = await run("05_topics/emit_log_topic.py", "kern.warning", "hot", url=amqp_url)
    assert (code, out) == (0, " [x] Sent kern.warning:hot\n")
    assert await asyncio.wait_for(receiving, 20) == ("kern.warning", b"hot")


# ---------------------------------------------------------------- tutorials 6 and 7


@pytest.fixture
async def rpc_queue(broker: Broker) -> AsyncIterator[None]:
    with contextlib.suppress(Exception):
        await broker.delete_queue("rpc_queue")
    yield
    with contextlib.suppress(Exception):
        await broker.delete_queue("rpc_queue")


@pytest.mark.usefixtures("rpc_queue")
async def test_rpc(amqp_url: str) -> None:
    server = await Script.start("06_rpc/rpc_server.py", url=amqp_url)
    assert await server.line() == " [x] Awaiting RPC requests"
    code, out, err = await run("06_rpc/rpc_client.py", url=amqp_url)
    assert (code, out, err) == (0, " [x] Requesting fib(30)\n [.] Got 832040\n", "")
    assert await server.line() == " [.] fib(30)"
    code, out, _ = await run("06_rpc/rpc_client.py", "10", url=amqp_url)
    assert out == " [x] Requesting fib(10)\n [.] Got 55\n"
    assert await server.line() == " [.] fib(10)"
    await assert_clean_exit(server)


@pytest.mark.usefixtures("rpc_queue")
async def test_rpc_client_without_server_fails_fast(amqp_url: str) -> None:
    code, out, err = await run("06_rpc/rpc_client.py", "--timeout", "5", url=amqp_url)
    assert code == 1
    assert out == " [x] Requesting fib(30)\n"
    assert "NoResponder" in err


def pika_rpc_call(url: str, n: int) -> int:
    """The official tutorial 6 client, as written there (exclusive callback queue, correlation id)."""
    import uuid

    connection = _pika(url)
    channel = connection.channel()
    callback_queue = channel.queue_declare(queue="", exclusive=True).method.queue
    response: list[bytes] = []
    corr_id = str(uuid.uuid4())

    def on_response(ch, method, props, body):  # type: ignore[no-untyped-def]
        if corr_id == props.correlation_id:
            response.append(body)

    channel.basic_consume(queue=callback_queue, on_message_callback=on_response, auto_ack=True)
    channel.basic_publish(
        exchange="",
        routing_key="rpc_queue",
        properties=pika.BasicProperties(reply_to=callback_queue, correlation_id=corr_id),
        body=str(n),
    )
    deadline = 100
    while not response and deadline:
        connection.process_data_events(time_limit=0.1)
        deadline -= 1
    connection.close()
    assert response, "no reply within 10 s"
    return int(response[0])


@pytest.mark.usefixtures("rpc_queue")
async def test_pika_client_to_our_server(amqp_url: str) -> None:
    server = await Script.start("06_rpc/rpc_server.py", url=amqp_url)
    assert await server.line() == " [x] Awaiting RPC requests"
    assert await asyncio.to_thread(pika_rpc_call, amqp_url, 30) == 832040
    assert await asyncio.to_thread(pika_rpc_call, amqp_url, 1) == 1
    assert await server.line() == " [.] fib(30)"
    await assert_clean_exit(server)


@pytest.mark.usefixtures("rpc_queue")
async def test_our_client_to_pika_server(amqp_url: str) -> None:
    stop = asyncio.Event()
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()

    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    def serve() -> None:
        """The official tutorial 6 server, as written there."""
        connection = _pika(amqp_url)
        channel = connection.channel()
        channel.queue_declare(queue="rpc_queue")

        def on_request(ch, method, props, body):  # type: ignore[no-untyped-def]
            n = int(body)
            response = fib(n)
            ch.basic_publish(
                exchange="",
                routing_key=props.reply_to,
                properties=pika.BasicProperties(correlation_id=props.correlation_id),
                body=str(response),
            )
            ch.basic_ack(delivery_tag=method.delivery_tag)

        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(queue="rpc_queue", on_message_callback=on_request)
        loop.call_soon_threadsafe(ready.set)
        while not stop.is_set():
            connection.process_data_events(time_limit=0.1)
        connection.close()

    serving = asyncio.ensure_future(asyncio.to_thread(serve))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        code, out, err = await run("06_rpc/rpc_client.py", "20", url=amqp_url)
        assert (code, out) == (0, " [x] Requesting fib(20)\n [.] Got 6765\n"), err
    finally:
        stop.set()
        await serving


async def test_publisher_confirms(amqp_url: str) -> None:
    code, out, err = await run("07_publisher_confirms/publisher_confirms.py", "--count", "500", url=amqp_url)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("Published 500 messages individually in ") and lines[0].endswith(" ms")
    assert lines[1].startswith("Published 500 messages in batch in ")
    assert lines[2].startswith("Published 500 messages and handled confirms asynchronously in ")


# ---------------------------------------------------------------- tutorial 2


@pytest.fixture
async def task_queue(broker: Broker) -> AsyncIterator[None]:
    for name in ("task_queue", "task_queue.dlq"):
        with contextlib.suppress(Exception):
            await broker.delete_queue(name)
    yield
    for name in ("task_queue", "task_queue.dlq"):
        with contextlib.suppress(Exception):
            await broker.delete_queue(name)


@pytest.mark.usefixtures("task_queue")
async def test_work_queues_share_the_work(amqp_url: str, broker: Broker) -> None:
    workers = [await Script.start("02_work_queues/worker.py", url=amqp_url) for _ in range(2)]
    for w in workers:
        assert await w.line() == WAITING_MESSAGES
    await until(lambda: _consumers(broker, "task_queue", 2))  # both consuming
    messages = ["First message.", "Second message.", "Third.", "Fourth."]
    for message in messages:
        code, out, _ = await run("02_work_queues/new_task.py", *message.split(), url=amqp_url)
        assert (code, out) == (0, f" [x] Sent {message}\n")
    printed: list[list[str]] = [[], []]

    async def follow(i: int) -> None:
        while True:
            printed[i].append(await workers[i].line(timeout=60))

    readers = [asyncio.ensure_future(follow(i)) for i in range(2)]
    try:  # four one-second tasks on two workers
        await wait_for(lambda: sum(lines.count(" [x] Done") for lines in printed) == 4, 30)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    received: list[list[str]] = []
    for w, before in zip(workers, printed, strict=True):
        code, out, err = await w.stop()  # SIGTERM
        assert code == 0, err
        lines = before + out.splitlines()
        assert lines[-1] == "Interrupted"
        got = [line.removeprefix(" [x] Received ") for line in lines if line.startswith(" [x] Received ")]
        assert lines.count(" [x] Done") == len(got)
        received.append(got)
    assert sorted(m for got in received for m in got) == sorted(messages)
    assert all(got for got in received), received  # prefetch 1: the work was shared


async def _consumers(broker: Broker, queue: str, count: int) -> bool:
    with contextlib.suppress(Exception):  # not declared yet
        return (await broker.queue_counts(queue))[1] >= count
    return False


@pytest.mark.usefixtures("task_queue")
async def test_pika_new_task_to_our_worker(amqp_url: str) -> None:
    worker = await Script.start("02_work_queues/worker.py", url=amqp_url)
    assert await worker.line() == WAITING_MESSAGES

    def new_task() -> None:
        """The official tutorial 2 producer, as written there."""
        connection = _pika(amqp_url)
        channel = connection.channel()
        channel.queue_declare(queue="task_queue", durable=True)
        channel.basic_publish(
            exchange="",
            routing_key="task_queue",
            body="Hello..",
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
        )
        connection.close()

    await asyncio.to_thread(new_task)
    assert await worker.line() == " [x] Received Hello.."
    assert await worker.line(timeout=10) == " [x] Done"
    await assert_clean_exit(worker)


@pytest.mark.usefixtures("task_queue")
async def test_our_new_task_to_pika_worker(amqp_url: str) -> None:
    code, _, err = await run("02_work_queues/new_task.py", "A", "task.", url=amqp_url)
    assert code == 0, err

    def work() -> tuple[bytes, int]:
        """The official tutorial 2 worker, as written there (prefetch 1, manual ack)."""
        connection = _pika(amqp_url)
        channel = connection.channel()
        channel.queue_declare(queue="task_queue", durable=True)
        channel.basic_qos(prefetch_count=1)
        try:
            for method, props, body in channel.consume("task_queue", inactivity_timeout=10):
                assert body is not None, "pika received nothing"
                channel.basic_ack(delivery_tag=method.delivery_tag)
                return bytes(body), int(props.delivery_mode)
            raise AssertionError("unreachable")
        finally:
            channel.cancel()
            connection.close()

    assert await asyncio.to_thread(work) == (b"A task.", 2)
