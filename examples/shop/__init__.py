"""The shop: an API gateway in front of products, reviews, cart, orders and invoices, with CQRS and replay.

Each service is an :class:`amqpkit.service.Service` in a module of its own,
run as a process of its own (``amqpkit run examples.shop.products:service``);
the gateway is an ASGI app. See examples/shop/README.md.
"""
