"""The gateway keeps a view of every order task it ever placed: its memory grows with every order, for ever.

Found by a hunt. ``Tasks.tasks`` (the statuses GET /tasks/{id} answers from) is a dict that nothing prunes;
the events that come before their order is known (``Tasks.early``) are capped at ``EARLY_LIMIT`` (10,000),
the views are not. Measured (tracemalloc): 753 bytes per completed order, 37.7 MB for 50,000, none freed;
in a hunt's load runs the gateway's RSS went from 57.7 to 63.2 MB over 7,860 orders. A gateway that runs
for weeks grows without bound. The test places 20,000 orders, each completed, and expects the views to be
kept within a cap (the latest, as the early events are).
"""

from __future__ import annotations

from datetime import UTC, datetime

from amqpkit import TaskEvent, TaskStatus
from examples.shop.gateway import Tasks


def test_completed_task_views_are_not_kept_for_ever() -> None:
    tasks = Tasks()
    for i in range(2 * Tasks.EARLY_LIMIT):
        task_id = f"o-{i:012x}"
        tasks.placed(task_id, "ada")
        for status in (TaskStatus.RUNNING, TaskStatus.COMPLETED):
            tasks.update(TaskEvent(task_id=task_id, queue="shop.place-order", status=status, attempt=1,
                                   timestamp=datetime.now(UTC)))  # fmt: skip
    assert len(tasks.tasks) <= Tasks.EARLY_LIMIT, len(tasks.tasks)  # (KEPT_LIMIT, the same 10,000)
    assert f"o-{2 * Tasks.EARLY_LIMIT - 1:012x}" in tasks.tasks  # the latest are the ones kept
