"""A module whose import takes long (a big framework, a model loaded at import): a stop signal comes in the middle."""

from __future__ import annotations

import time

from amqpkit.service import Service

print("importing slowly", flush=True)
time.sleep(60)

service = Service("slow-import")


async def handle(job: dict[str, object]) -> None: ...
