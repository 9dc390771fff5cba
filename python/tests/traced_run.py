"""A traced consumer in a process of its own (the span export is process-wide),
run by ``test_traces``: ``traced_run.py BROKERS TOPIC GROUP API_URL TOKEN COUNT``.

It exports to the ``OTEL_*`` endpoint of its environment, handles ``COUNT``
events of type ``traced`` with lifecycle reporting, prints each one's
``trace_context`` as a JSON line, then stops, drains and shuts the export down.
"""

from __future__ import annotations

import asyncio
import json
import sys

from xzepr_consumer import (
    CloudEventMessage,
    KafkaConsumerConfig,
    XzeprClient,
    XzeprClientConfig,
    XzeprConsumer,
    init_tracing,
)


async def consume(brokers: str, topic: str, group: str, url: str, token: str, n: int) -> None:
    config = KafkaConsumerConfig(
        brokers=brokers, topic=topic, service_name="py-traced", group_id=group
    )
    consumer = XzeprConsumer(
        config,
        client=XzeprClient(XzeprClientConfig(url, token)),
        work_name="py-traced",
        type_prefixes=["traced"],
    )
    seen: list[CloudEventMessage] = []

    async def handle(message: CloudEventMessage) -> None:
        seen.append(message)
        if len(seen) >= n:
            consumer.stop()

    await asyncio.wait_for(consumer.run_with_callback(handle), 120)
    for m in seen:
        t = m.trace_context
        context = None if t is None else {"traceparent": t.traceparent, "tracestate": t.tracestate}
        print(json.dumps({"id": m.id, "trace_context": context}), flush=True)


def main() -> None:
    brokers, topic, group, url, token, count = sys.argv[1:]
    tracing = init_tracing()
    if tracing is None:
        sys.exit("init_tracing() found no OTEL_* endpoint")
    with tracing:
        asyncio.run(consume(brokers, topic, group, url, token, int(count)))


if __name__ == "__main__":
    main()
