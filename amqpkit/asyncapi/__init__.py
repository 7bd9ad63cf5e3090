"""An AsyncAPI 3.0.0 document of a :class:`~amqpkit.service.Service`, from its declarations.

``amqpkit asyncapi MODULE:ATTR [-o FILE] [--yaml]`` writes it. Nothing is
sent to a broker: the document comes from the same pattern objects the
service runs on, built but not started.

How the service maps onto AsyncAPI:

- **servers**: one per URL of the settings (``amqp``/``amqps``, host and
  port, the vhost as ``pathname``); the user and password are never written,
  only that the server asks for them (a ``userPassword`` security scheme).
- **channels**: an exchange with a routing key (``is: routingKey``) for
  publish/subscribe, one per binding of a subscriber and per declared
  publisher (shared when both meet); a queue (``is: queue``) for a work
  queue and an RPC request queue; and, for each RPC queue, the reply channel
  (the caller's ``reply_to``, so its address is unknown until run time).
- **operations**: ``receive`` for each subscriber binding, worker and RPC
  method; ``send`` for each declared publisher. An RPC method's operation
  carries a ``reply`` object: where the reply goes (``replyTo``), its
  channel and its messages (the result, or amqpkit's error document).
- **messages**: the payload's JSON Schema from the handler's annotation
  (pydantic models and plain types; models go to ``components.schemas``),
  the content type its codec writes, the correlation id for RPC, and AMQP
  message bindings (``messageType``: the RPC method name).
- AMQP **channel, operation and message bindings** (version 0.3.0); what
  AsyncAPI has no field for (the subscription queue, a work queue's
  dead-letter queue and retry policy) goes into ``x-amqpkit-*`` extensions.
"""

from .document import ASYNCAPI_VERSION, asyncapi_document
from .document import SECURITY_SCHEME as SECURITY_SCHEME
from .formats import to_json, to_yaml
from .messages import AMQP_BINDING_VERSION as AMQP_BINDING_VERSION
from .messages import ERROR_MESSAGE as ERROR_MESSAGE
from .messages import ERROR_SCHEMA as ERROR_SCHEMA
from .messages import SCHEMA_REF as SCHEMA_REF

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document", "to_json", "to_yaml"]
