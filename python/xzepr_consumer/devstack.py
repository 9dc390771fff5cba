"""The embedded dev stack, for tests and local runs.

``DevStack()`` starts librdkafka's in-process broker with the topic and an XZepr
stand-in (receivers and events endpoints, bearer token, 5 ms per event post)
that publishes every event it records back to the topic, as XZepr does.
``produce``, ``generate_events``, ``committed_offsets`` and ``read_topic`` work
against any broker.
"""

from ._native import (
    DevStack,
    StandIn,
    committed_offsets,
    generate_events,
    produce,
    read_topic,
)

__all__ = [
    "DevStack",
    "StandIn",
    "committed_offsets",
    "generate_events",
    "produce",
    "read_topic",
]
