"""serve_metrics(): this process's metrics in Prometheus text format over HTTP (``amqpkit run --metrics-port``)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from .wiring import instrument, uninstrument

log = logging.getLogger("amqpkit.telemetry")


class MetricsServer:
    """What :func:`serve_metrics` started: ``url``, and :meth:`close` to stop serving and stop instrumenting."""

    def __init__(self, httpd: Any, thread: Any, reader: Any, provider: Any, url: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self._reader = reader
        self._provider = provider
        self.url = url

    def close(self) -> None:
        uninstrument()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
        self._provider.shutdown()  # the reader leaves prometheus_client's registry


def _request_failed(request: Any, client_address: Any) -> None:
    """A request that ended in an error (a scraper that gave up and reset the connection, a request that is not
    HTTP): one DEBUG line. socketserver's own printed its traceback to stderr, outside the logging (and so
    outside --log-json): 310 of them in 3 minutes of aborted scrapes, in a hunt."""
    exc = sys.exc_info()[1]
    log.debug("metrics request from %s ended: %s: %s", _peer(client_address), type(exc).__name__, exc)


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve this process's metrics in Prometheus text format on ``http://host:port/metrics``, and instrument.

    Uses ``opentelemetry-exporter-prometheus`` (in the ``otel`` extra); port 0
    picks a free port (see ``url``). Traces go to the global tracer provider.
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        httpd, thread = start_http_server(port, addr=host)
    except BaseException:
        provider.shutdown()
        raise
    # This server's own (socketserver looks it up on the server at each failed request), before its URL is out
    httpd.handle_error = _request_failed  # type: ignore[method-assign]
    url = f"http://{host}:{httpd.server_port}/metrics"
    instrument(meter_provider=provider)
    log.info("metrics in Prometheus text format on %s", url)
    return MetricsServer(httpd, thread, reader, provider, url)
