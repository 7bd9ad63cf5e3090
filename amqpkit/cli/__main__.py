"""``python -m amqpkit.cli``: the ``amqpkit`` command."""

from . import main

main()
