"""A service whose process worker asks for its ServiceContext: refused when declared, so importing this fails."""

from __future__ import annotations

from typing import Any

from amqpkit.service import Service, ServiceContext

svc = Service("refused")


@svc.worker("refused.jobs", executor="process")
def crunch(job: dict[str, Any], ctx: ServiceContext) -> None: ...
