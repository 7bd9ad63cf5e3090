"""The soak: amqpkit under a steady mixed load, with a fault every ~30 s, and a ledger at the end.

Run it with ``bash scripts/soak.sh`` (``--help`` for the options). The parts:

- ``node``: the soak's own RabbitMQ node (its own name, ports and folders), and rabbitmqctl against it;
- ``load``: the load, through amqpkit's public API, recording what it sent and what arrived;
- ``faults``: the fault rotation;
- ``ledger``: the accounting, by message id, from the records;
- ``task_handler``: the task handler the worker processes run (``amqpkit worker soak.task_handler:handle``);
- ``main``: the command line and the run from start to end.
"""
