"""A service in one object: its handlers, its resources, one Broker, and a way to run it.

::

    svc = Service("billing", version="1.2.0")
    orders = Exchange("orders", type="topic")
    invoices_out = svc.publisher(Exchange("invoices", type="topic"), Invoice, routing_key="invoice.created")

    @svc.resource
    async def database(ctx: ServiceContext) -> AsyncIterator[Pool]:
        pool = await make_pool()          # at startup
        yield pool
        await pool.close()                # at shutdown

    @svc.subscriber(orders, binding_keys=["order.placed"], queue="billing.orders")
    async def on_order(order: OrderPlaced, ctx: ServiceContext) -> None:
        await ctx.work_queue("billing.invoices").enqueue(order)

    @svc.worker("billing.invoices", concurrency=8)
    async def make_invoice(order: OrderPlaced, db: Pool, ctx: ServiceContext) -> None:
        invoice = await db.insert_invoice(order)
        await ctx.publisher(invoices_out).publish(invoice, routing_key="invoice.created")

    @svc.rpc("billing.rpc")
    async def quote(order: OrderPlaced) -> float: ...

Run it with ``amqpkit run module:svc``, or in-process with
``async with svc.serve(settings) as running: ...``.

Each decorator records a declaration; nothing touches the broker until the
service starts. Then the service builds the existing pattern classes —
:class:`~amqpkit.Subscriber`, :class:`~amqpkit.WorkQueue` and
:class:`~amqpkit.Worker`, :class:`~amqpkit.RpcServer` (one per request
queue, holding every method on it), :class:`~amqpkit.Publisher` — through
their public constructors, on one :class:`~amqpkit.Broker`, which restores
all of it after a reconnect as it does for each class used alone.

A handler's first parameter takes the message (``X`` or ``Delivery[X]``, as
for the classes). Any other parameter is filled by its annotation:

- :class:`ServiceContext`: the running service (its broker, resources, publishers, work queues);
- a type a ``@svc.resource`` provides: that resource;
- :class:`~amqpkit.TaskContext` (workers only): the task's context;
- a parameter with a default is left alone.

Anything else is an error at startup, as is an annotation that does not
resolve, two handlers on one queue, or one name declared twice with
different specs (:class:`ServiceError`, naming both). A worker on the
process executor gets the message and a TaskContext only: asking for more
is refused already by its decorator.

The modules of this package, each one concern (the names above are the public ones):

- ``specs``: what a declaration records (:class:`HandlerSpec`, :class:`PublisherSpec`) and :class:`ServiceError`;
- ``decorators``: :class:`Service` and its decorators, ``check()`` and ``serve()``;
- ``handlers``: what a handler's signature asks for, checked at startup, :class:`ServiceContext`, and the
  wrapper that fills the parameters (the process executor's limits too);
- ``lifespan``: resources and startup and shutdown hooks;
- ``plan``: the pattern objects built from the declarations on one Broker, and the conflicts between them;
- ``running``: :class:`RunningService`, its start and stop, readiness and failure;
- ``loading``: :func:`load_service` (``MODULE:ATTR``).
"""

from .decorators import Service
from .handlers import ServiceContext
from .loading import load_service
from .running import RunningService
from .specs import HandlerSpec, PublisherSpec, ServiceError

__all__ = [
    "HandlerSpec",
    "PublisherSpec",
    "RunningService",
    "Service",
    "ServiceContext",
    "ServiceError",
    "load_service",
]
