"""What a handler is given, beside the message: :class:`ServiceContext`, a resource, a TaskContext.

:func:`inspect_handler` reads a handler's signature at startup (ServiceError
for what nothing fills); :func:`bind_handler` makes the function the pattern
calls, which fills those parameters from the running service. A worker on the
process executor gets the task's value and a TaskContext only:
:func:`check_process_handler` refuses more when it is declared.
"""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ..connection import Broker
from ..context import TaskContext
from ..message import Delivery
from ..patterns.pubsub import Publisher
from ..patterns.work_queue import WorkQueue
from .specs import HandlerSpec, PublisherSpec, ServiceError, resolved_hints, type_name

if TYPE_CHECKING:
    from .decorators import Service
    from .running import RunningService

T = TypeVar("T")
R = TypeVar("R")


class ServiceContext:
    """What a handler of a running service may ask for: ``ctx: ServiceContext``.

    ``broker``, ``service``, :meth:`get` (a resource by its type),
    :meth:`publisher` (the live publisher of a declared :class:`PublisherSpec`),
    :meth:`work_queue` (the work queue of one of the service's workers, to
    enqueue tasks) and ``state``, a dict for what startup hooks want to share.
    """

    def __init__(self, running: RunningService) -> None:
        self._running = running
        self.state: dict[str, Any] = {}

    @property
    def service(self) -> Service:
        return self._running.service

    @property
    def broker(self) -> Broker:
        return self._running.broker

    def get(self, kind: type[R]) -> R:
        """The resource of type ``kind`` (made at startup); KeyError if the service has none."""
        try:
            return cast(R, self._running.resources[kind])
        except KeyError:
            raise KeyError(f"service {self.service.name} has no resource of type {type_name(kind)}") from None

    def publisher(self, spec: PublisherSpec[T]) -> Publisher[T]:
        """The live :class:`~amqpkit.Publisher` for a publisher the service declared."""
        plan = self._running.plan
        for declared, pub in plan.publishers if plan is not None else ():
            if declared is spec:
                return cast("Publisher[T]", pub)
        raise KeyError(f"publisher {spec.name} is not declared by service {self.service.name}")

    def work_queue(self, name: str) -> WorkQueue[Any]:
        """The :class:`~amqpkit.WorkQueue` of this service's worker on ``name`` (to ``enqueue`` tasks)."""
        plan = self._running.plan
        for _, work, _ in plan.workers if plan is not None else ():
            if work.name == name:
                return work
        raise KeyError(f"service {self.service.name} has no worker on {name!r}")

    def __repr__(self) -> str:
        return f"<ServiceContext of {self.service.name}>"


# ---------------------------------------------------------------------- reading a handler's signature


def inspect_handler(spec: HandlerSpec, resources: Mapping[Any, str]) -> None:
    """Read what ``spec``'s signature asks for into ``spec``; ServiceError for what nothing can fill."""
    what = f"{spec.kind} {spec.name}"
    hints = resolved_hints(spec.fn, what)
    try:
        signature = inspect.signature(spec.fn)
    except (TypeError, ValueError) as exc:
        raise ServiceError(f"{what}: cannot read its signature: {exc}") from None
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise ServiceError(f"{what} must take the message as its first parameter")
    first = positional[0]
    annotation = hints.get(first.name, Any)
    if annotation is ServiceContext or annotation is TaskContext or annotation in resources:
        raise ServiceError(f"{what}: the message comes first, then {type_name(annotation)}")
    spec.wants_delivery = annotation is Delivery or typing.get_origin(annotation) is Delivery
    if spec.wants_delivery:
        args = typing.get_args(annotation)
        annotation = args[0] if args else bytes
    spec.message_type = annotation
    spec.returns = hints.get("return", Any)
    spec.injected, spec.task_context = {}, []
    for p in params:
        if p is first or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        wanted = hints.get(p.name, inspect.Parameter.empty)
        if wanted is ServiceContext or wanted in resources:
            if p.kind is p.POSITIONAL_ONLY:
                raise ServiceError(f"{what}: parameter {p.name!r} is positional-only; make it a normal one")
            spec.injected[p.name] = wanted
        elif wanted is TaskContext:
            if spec.kind != "worker":
                raise ServiceError(f"{what}: only worker handlers get a TaskContext (parameter {p.name!r})")
            spec.task_context.append(p.name)
        elif p.default is inspect.Parameter.empty:
            known = ", ".join(sorted(type_name(t) for t in resources)) or "none declared"
            shown = "no annotation" if wanted is inspect.Parameter.empty else type_name(wanted)
            raise ServiceError(
                f"{what}: nothing fills parameter {p.name!r} ({shown}); a handler may ask for the message, "
                f"ServiceContext, TaskContext (workers) or a resource of the service ({known})"
            )
    if spec.options.get("executor") == "process":
        if spec.injected:  # declared before a check could see the annotations resolve (see check_process_handler)
            shown = ", ".join(f"{n} ({type_name(t)})" for n, t in spec.injected.items())
            raise ServiceError(_process_refusal(spec, shown))
        found = _found_by_name(spec.fn)
        if found is not None:
            raise ServiceError(
                f"{spec.kind} {spec.name} runs in pool processes (executor='process'), which find the handler by "
                f"its name, and {found}. Make it a module-level function, with @svc.{spec.kind} as its outermost "
                "decorator"
            )


def check_process_handler(spec: HandlerSpec) -> None:
    """Refuse, when it is declared, a handler the process executor cannot run (:class:`ServiceError`).

    A pool process imports the handler by name and gets the task's value and,
    if asked for, a :class:`~amqpkit.TaskContext` (its reports travel back).
    Nothing else crosses: not a resource, not the :class:`ServiceContext`,
    not the ``Delivery`` (settling it happens in the service's process).
    Annotations that do not resolve yet are read as written; :meth:`Service.check`
    looks again once they do.
    """
    fn = spec.fn
    what = f"{spec.kind} {spec.name} runs in pool processes (executor='process')"
    if "<locals>" in (getattr(fn, "__qualname__", None) or "") or getattr(fn, "__name__", None) == "<lambda>":
        raise ServiceError(f"{what}, which import it by name: make it a module-level function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # Service.check says why
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a name defined further down the module: read the annotation as written
        hints = {}
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        return  # Service.check says why
    first = positional[0]
    annotation = hints.get(first.name, first.annotation)
    if annotation is Delivery or typing.get_origin(annotation) is Delivery or _written_as(annotation, "Delivery"):
        raise ServiceError(
            f"{what}: it gets the message's value, not the Delivery (the delivery is settled in the service's process)"
        )
    refused = []
    for p in params:
        if p is first or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        wanted = hints.get(p.name, p.annotation)
        if spec.kind == "worker" and (wanted is TaskContext or _written_as(wanted, "TaskContext")):
            continue
        if wanted is p.empty:
            refused.append(p.name)
        else:
            refused.append(f"{p.name} ({wanted if isinstance(wanted, str) else type_name(wanted)})")
    if refused:
        raise ServiceError(_process_refusal(spec, ", ".join(refused)))


def _found_by_name(fn: Any) -> str | None:
    """Why a pool process would not find function ``fn`` by its module and name (None: it would, or not a function)."""
    if not inspect.isfunction(fn):
        return None  # a callable object or a partial is sent as itself, not by name
    module = sys.modules.get(fn.__module__)
    target: Any = module
    for part in fn.__qualname__.split("."):
        target = getattr(target, part, None)
    if target is fn:
        return None
    if target is None:
        return f"{fn.__module__}.{fn.__qualname__} names nothing"
    return f"{fn.__module__}.{fn.__qualname__} is another object (a decorator over @svc.worker?)"


def _process_refusal(spec: HandlerSpec, what: str) -> str:
    return (
        f"{spec.kind} {spec.name} runs in pool processes (executor='process'): it cannot be given {what}. "
        "Resources and the ServiceContext live in the service's process and do not cross to a pool process; "
        "a process handler gets the message's value (and a worker's, if it asks, a TaskContext). Leave "
        "executor='process' off "
        "(a plain def then runs in a thread, with its resources), or move what needs them to another handler"
    )


def _written_as(annotation: Any, name: str) -> bool:
    """A string annotation names ``name`` (``"TaskContext"``, ``"amqpkit.TaskContext"``, ``"Delivery[X]"``)."""
    return isinstance(annotation, str) and annotation.split("[", 1)[0].strip().rsplit(".", 1)[-1] == name


# ---------------------------------------------------------------------- binding a handler to a running service


def bind_handler(spec: HandlerSpec, running: RunningService | None) -> Callable[..., Any]:
    """The function given to the pattern: ``spec.fn`` itself, or a wrapper that fills the injected parameters.

    A handler on the process executor always goes as itself: the pool pickles
    it by name, and a wrapper made here could not be found by that name in a
    pool process. Such a handler never asks for anything injected
    (:func:`check_process_handler`, and :func:`inspect_handler` again).
    """
    fn = spec.fn
    if not spec.injected or spec.options.get("executor") == "process":
        return fn
    injected = dict(spec.injected)

    def arguments() -> dict[str, Any]:
        if running is None:
            raise RuntimeError(f"{spec.name} was called outside a running service")
        return {
            name: running.context if wanted is ServiceContext else running.resources[wanted]
            for name, wanted in injected.items()
        }

    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(fn):

        async def call_async(message: Any, **kwargs: Any) -> Any:
            return await fn(message, **kwargs, **arguments())

        wrapper = call_async
    else:

        def call_sync(message: Any, **kwargs: Any) -> Any:
            return fn(message, **kwargs, **arguments())

        wrapper = call_sync
    functools.update_wrapper(wrapper, fn)  # name, module, docs, and __wrapped__ for the watchdog's reports
    message_annotation = Delivery[spec.message_type] if spec.wants_delivery else spec.message_type  # type: ignore[name-defined]
    params = [inspect.Parameter("message", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=message_annotation)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=TaskContext) for n in spec.task_context]
    annotations: dict[str, Any] = {"message": message_annotation, **dict.fromkeys(spec.task_context, TaskContext)}
    annotations["return"] = spec.returns
    cast(Any, wrapper).__signature__ = inspect.Signature(params, return_annotation=spec.returns)
    wrapper.__annotations__ = annotations
    return wrapper
