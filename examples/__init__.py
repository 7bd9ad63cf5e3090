"""Runnable examples of amqpkit services; run them from the checkout's root (`amqpkit run examples.billing:service`)."""
