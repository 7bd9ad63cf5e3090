"""A handler module that fails while it is imported (what `amqpkit worker` must say in one line)."""

raise RuntimeError("config file /etc/app.toml not found")
