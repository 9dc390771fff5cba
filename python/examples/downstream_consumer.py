#!/usr/bin/env python3
"""Example downstream Python service consuming XZepr events (the plan's example).

The package posts the work's lifecycle itself: ``deployment-processing.started``
before the handler runs, ``.completed`` after it returns or ``.failed`` (with
the exception's type and message) if it raises; an offset is committed only
once its handler finished and both posts were acknowledged.

Run it against the embedded dev stack:

    cargo run --features cli -- dev          # prints the XZEPR_* variables
    export XZEPR_KAFKA_BROKERS=... XZEPR_API_URL=... XZEPR_API_TOKEN=...
    cargo run --features cli -- produce --brokers "$XZEPR_KAFKA_BROKERS" --events 100
    python python/examples/downstream_consumer.py

Ctrl-C (or SIGTERM) stops it gracefully: running handlers finish, offsets are
committed, lifecycle posts are sent.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Any

from xzepr_consumer import (
    CloudEventMessage,
    DeadLetter,
    KafkaConsumerConfig,
    MemoryStore,
    MessageHandler,
    Ordering,
    RetryPolicy,
    Settings,
    XzeprClient,
    XzeprConsumer,
)

logging.basicConfig(
    level=logging.INFO,
    format="%(asctime)s - %(name)s - %(levelname)s - %(message)s",
)
logger = logging.getLogger(__name__)

SERVICE_NAME = "my-downstream-service"


class DeploymentHandler(MessageHandler):
    """Handler for processing deployment events."""

    async def handle(self, message: CloudEventMessage) -> dict[str, Any]:
        """Process a deployment event; up to ``max_in_flight`` of these run at once."""
        logger.info("Processing deployment event: %s (type: %s)", message.id, message.event_type)
        # Simulate doing work (an await: other events proceed meanwhile).
        await asyncio.sleep(2)
        if not message.success:
            # Retried twice; then posted as `deployment-processing.failed`, with
            # this type and message, and dead-lettered.
            raise RuntimeError(f"deployment {message.id} reported failure")
        # Added to the `details` of `deployment-processing.completed`.
        return {
            "source_event_id": message.id,
            "processed_at": datetime.now(timezone.utc).isoformat(),
        }


async def main() -> None:
    """Main entry point."""
    kafka_config = KafkaConsumerConfig.from_env(SERVICE_NAME)
    logger.info(
        "Initializing Kafka consumer: brokers=%s, topic=%s, group_id=%s",
        kafka_config.brokers,
        kafka_config.topic,
        kafka_config.group_id,
    )

    async with XzeprClient.from_env() as client:
        consumer = XzeprConsumer(
            kafka_config,
            # The pipeline finds this receiver by name and type, or creates it.
            client=client,
            receiver_name=f"{SERVICE_NAME}-receiver",
            work_name="deployment-processing",
            work_version="1.0.0",
            settings=Settings(
                # Only deployment events reach the handler; the rest are
                # committed as they pass, with no posts.
                types=["deployment."],
                ordering=Ordering.PER_KEY,
                max_in_flight=256,
                # Three attempts, then the event goes to `<topic>.dlq` (which
                # must exist: until the broker takes a letter, its offset waits).
                retry=RetryPolicy(max_attempts=3),
                dead_letter=DeadLetter(),
                # Prometheus metrics, /health and /ready.
                metrics_addr="127.0.0.1:9464",
            ),
            # A replayed event whose work was done already is not run again.
            idempotency=MemoryStore(),
        )
        logger.info("Starting consumer loop")
        try:
            await consumer.run(DeploymentHandler())
        except KeyboardInterrupt:
            logger.info("Shutting down consumer")
        logger.info("Stopped: %s", consumer.metrics())


if __name__ == "__main__":
    asyncio.run(main())
