"""Bench: this package against the plan's Python consumer, side by side in one run.

One dev stack (librdkafka's in-process mock broker), one topic of generated ~1 KB
XZepr events, and in the same process:

(a) the plan's way: a confluent-kafka ``Consumer``, ``poll()`` one message at a
    time, ``json.loads`` into the package's dataclasses (field by field, as the
    plan's ``from_dict`` does), ``await handler.handle(event)``, then
    ``commit(message, asynchronous=False)`` per message; no-op handler;
(b) this package: ``XzeprConsumer`` with its defaults, a no-op ``async def``
    handler;
(c) the plan's way with lifecycle reporting: as (a), with ``post_work_started``,
    the handler and ``post_work_completed`` each awaited in turn through the
    plan's httpx client, to an XZepr stand-in answering each post after 5 ms;
(d) this package with automatic lifecycle to the same stand-in.

(a) and (b) alternate for ``--rounds`` rounds, each round a fresh consumer group
reading the topic from the start; the median of each is reported. Each run is
timed from its first message to its N-th one finished (for (b) the N-th handler
return; for (d) the N-th ``completed`` post acknowledged, polled every 5 ms).
The stand-in of (c) and (d) publishes nowhere, so the topic holds only the
generated events.

Not run in CI. Run from a venv with the package installed::

    pip install ./python confluent-kafka httpx
    python python/bench/bench.py [--events N] [--rounds R] [--plan-lifecycle-events M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
from confluent_kafka import Consumer, KafkaError, KafkaException

from xzepr_consumer import (
    CloudEventData,
    CloudEventMessage,
    EventEntity,
    EventReceiverEntity,
    EventReceiverGroupEntity,
    KafkaConsumerConfig,
    XzeprClient,
    XzeprClientConfig,
    XzeprConsumer,
)
from xzepr_consumer.devstack import DevStack, StandIn, generate_events, produce

LATENCY_MS = 5
_groups = 0


@dataclass
class Figure:
    """One timed run: from its first message to its N-th one finished."""

    events: int
    wall_s: float
    #: CPU time of the whole process over the run: every thread, the in-process
    #: broker's included (the same broker for every path).
    cpu_s: float

    @property
    def eps(self) -> float:
        return self.events / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.events * 1e6


def fresh_group(kind: str) -> str:
    global _groups
    _groups += 1
    return f"bench-{kind}-{_groups}-{time.monotonic_ns()}"


# --- The plan's way --------------------------------------------------------------


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def plan_from_json(text: str) -> CloudEventMessage:
    """The plan's ``CloudEventMessage.from_json``: ``json.loads``, then each
    dataclass built from its dict."""
    d = json.loads(text)
    data = d.get("data", {})
    return CloudEventMessage(
        success=d["success"],
        id=d["id"],
        specversion=d["specversion"],
        event_type=d["type"],
        source=d["source"],
        api_version=d["api_version"],
        name=d["name"],
        version=d["version"],
        release=d["release"],
        platform_id=d["platform_id"],
        package=d["package"],
        data=CloudEventData(
            events=[
                EventEntity(
                    id=e["id"],
                    name=e["name"],
                    version=e["version"],
                    release=e["release"],
                    platform_id=e["platform_id"],
                    package=e["package"],
                    description=e["description"],
                    payload=e["payload"],
                    success=e["success"],
                    event_receiver_id=e["event_receiver_id"],
                    created_at=_ts(e["created_at"]),
                    owner_id=e.get("owner_id"),
                    resource_version=e.get("resource_version"),
                )
                for e in data.get("events", [])
            ],
            event_receivers=[
                EventReceiverEntity(
                    id=r["id"],
                    name=r["name"],
                    receiver_type=r["type"],
                    version=r["version"],
                    description=r["description"],
                    schema=r["schema"],
                    fingerprint=r["fingerprint"],
                    created_at=_ts(r["created_at"]),
                    owner_id=r.get("owner_id"),
                    resource_version=r.get("resource_version"),
                )
                for r in data.get("event_receivers", [])
            ],
            event_receiver_groups=[
                EventReceiverGroupEntity(
                    id=g["id"],
                    name=g["name"],
                    group_type=g["type"],
                    version=g["version"],
                    description=g["description"],
                    enabled=g["enabled"],
                    event_receiver_ids=g["event_receiver_ids"],
                    created_at=_ts(g["created_at"]),
                    updated_at=_ts(g["updated_at"]),
                    owner_id=g.get("owner_id"),
                    resource_version=g.get("resource_version"),
                )
                for g in data.get("event_receiver_groups", [])
            ],
        ),
    )


class PlanClient:
    """The plan's XZepr client: one httpx ``AsyncClient``, each post awaited."""

    def __init__(self, base_url: str, token: str) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=30,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def create_event(self, **body: Any) -> str:
        response = await self._client.request("POST", "/api/v1/events", json=body)
        if not response.is_success:
            raise RuntimeError(f"post failed: {response.status_code} {response.text}")
        return str(response.json()["data"])

    async def post_work(
        self, status: str, receiver_id: str, work_id: str, message: CloudEventMessage
    ) -> str:
        now = datetime.now(timezone.utc).isoformat()
        return await self.create_event(
            name=f"bench-work.{status}",
            version="1.0.0",
            release="1.0.0",
            platform_id=message.platform_id,
            package="bench",
            description=f"Work {status}: bench-work ({work_id})",
            payload={"work_id": work_id, "status": status, f"{status}_at": now, "details": {}},
            success=True,
            event_receiver_id=receiver_id,
        )


async def noop(message: CloudEventMessage) -> None:
    return None


async def plan_way(
    brokers: str,
    topic: str,
    n: int,
    reporter: tuple[PlanClient, str] | None = None,
) -> Figure:
    """The plan's ``XzeprConsumer.run`` loop, with a commit per message; events/s."""
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": fresh_group("plan"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 30000,
            "client.id": "xzepr-consumer-bench",
        }
    )
    consumer.subscribe([topic])
    seen = 0
    start = cpu = 0.0
    deadline = time.monotonic() + 60
    try:
        while seen < n:
            msg = consumer.poll(1.0)
            if msg is None:
                if seen == 0 and time.monotonic() > deadline:
                    raise RuntimeError("no message within 60 s")
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            if seen == 0:
                start, cpu = time.perf_counter(), time.process_time()
            value = msg.value()
            if value is not None:
                event = plan_from_json(value.decode("utf-8"))
                if reporter is None:
                    await noop(event)
                else:
                    client, receiver_id = reporter
                    work_id = f"work-{event.id}"
                    await client.post_work("started", receiver_id, work_id, event)
                    await noop(event)
                    await client.post_work("completed", receiver_id, work_id, event)
            consumer.commit(message=msg, asynchronous=False)
            seen += 1
        return Figure(seen, time.perf_counter() - start, time.process_time() - cpu)
    finally:
        consumer.close()


# --- This package ----------------------------------------------------------------


async def package_way(
    brokers: str,
    topic: str,
    n: int,
    lifecycle: tuple[XzeprClient, str] | None = None,
) -> Figure:
    """``XzeprConsumer`` with its defaults; events/s."""
    config = KafkaConsumerConfig(
        brokers=brokers, topic=topic, service_name="bench", group_id=fresh_group("pkg")
    )
    if lifecycle is None:
        consumer = XzeprConsumer(config)
    else:
        client, receiver_id = lifecycle
        consumer = XzeprConsumer(
            config, client=client, receiver_id=receiver_id, work_name="bench-work"
        )
    seen = 0
    start = end = cpu = cpu_end = 0.0
    done = asyncio.Event()

    async def handle(message: CloudEventMessage) -> None:
        nonlocal seen, start, end, cpu, cpu_end
        if seen == 0:
            start, cpu = time.perf_counter(), time.process_time()
        seen += 1
        if seen == n:
            end, cpu_end = time.perf_counter(), time.process_time()
            if lifecycle is None:
                done.set()

    task = asyncio.ensure_future(consumer.run_with_callback(handle))
    deadline = time.monotonic() + 120
    try:
        while not done.is_set():
            if task.done():
                task.result()
                raise RuntimeError("the consumer stopped on its own")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done after 120 s: {consumer.metrics()}")
            if lifecycle is not None and consumer.metrics().posted_completed >= n:
                end, cpu_end = time.perf_counter(), time.process_time()
                break
            try:
                await asyncio.wait_for(done.wait(), LATENCY_MS / 1000)
            except asyncio.TimeoutError:
                pass
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)
    return Figure(n, end - start, cpu_end - cpu)


# --- Main ------------------------------------------------------------------------


def show(f: Figure) -> str:
    return f"{fmt(f.eps):>10} events/s, {f.cpu_us:,.0f} µs CPU/event ({f.events:,} events)"


def median(figures: list[Figure]) -> Figure:
    """The run with the median events/s."""
    return sorted(figures, key=lambda f: f.eps)[len(figures) // 2]


def fmt(eps: float) -> str:
    return f"{eps:,.0f}" if eps >= 1000 else f"{eps:,.1f}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=40_000, help="events on the topic (N)")
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of (a) and (b)")
    ap.add_argument(
        "--plan-lifecycle-events",
        type=int,
        default=300,
        help="events for (c), the plan's sequential posts (~100 events/s)",
    )
    args = ap.parse_args()
    n = args.events
    if n // args.partitions > 4000:
        # The mock broker keeps ~5 MB per partition and silently drops the rest.
        raise SystemExit("at most 4,000 events per partition: raise --partitions")

    # Both ways decode the same messages to equal dataclasses.
    for _, v in generate_events(200):
        if plan_from_json(v.decode("utf-8")) != CloudEventMessage.from_json(v):
            raise SystemExit("the plan's decode and the package's disagree")

    stack = DevStack(partitions=args.partitions, api_latency_ms=LATENCY_MS, token="bench")
    standin = StandIn(token="bench", latency_ms=LATENCY_MS)  # publishes nowhere
    try:
        t = time.perf_counter()
        produce(stack.brokers, stack.topic, [(k, v) for k, v in generate_events(n)])
        size = sum(len(v) for _, v in generate_events(min(n, 1000))) / min(n, 1000)
        print(
            f"{n:,} events (~{size:,.0f} B) over {args.partitions} partitions produced "
            f"in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

        plan_noop: list[Figure] = []
        pkg_noop: list[Figure] = []
        for r in range(args.rounds):
            order = ("plan", "pkg") if r % 2 == 0 else ("pkg", "plan")
            for which in order:
                if which == "plan":
                    f = await plan_way(stack.brokers, stack.topic, n)
                    plan_noop.append(f)
                else:
                    f = await package_way(stack.brokers, stack.topic, n)
                    pkg_noop.append(f)
                print(f"round {r + 1}: {which:4} no-op {show(f)}", flush=True)

        client = XzeprClient(XzeprClientConfig(standin.url, standin.token))
        receiver = await client.discover_or_create_event_receiver(
            "bench", "worker", "1.0.0", "bench", {"type": "object"}
        )
        plan_client = PlanClient(standin.url, standin.token)
        try:
            m = min(args.plan_lifecycle_events, n)
            c = await plan_way(stack.brokers, stack.topic, m, (plan_client, receiver))
            print(f"plan lifecycle: {show(c)}", flush=True)
            d = await package_way(stack.brokers, stack.topic, n, (client, receiver))
            print(f"pkg  lifecycle: {show(d)}", flush=True)
        finally:
            await plan_client.close()
            await client.close()
        stats = standin.stats()

        a = median(plan_noop)
        b = median(pkg_noop)
        rows = [
            ("(a) plan's way, no-op handler", a),
            ("(b) this package, no-op async handler", b),
            (f"(c) plan's way, sequential posts, {LATENCY_MS} ms stand-in", c),
            (f"(d) this package, automatic lifecycle, {LATENCY_MS} ms stand-in", d),
        ]
        print()
        print("| path | events | events/s | process CPU per event |")
        print("| --- | ---: | ---: | ---: |")
        for name, f in rows:
            print(f"| {name} | {f.events:,} | {fmt(f.eps)} | {f.cpu_us:,.0f} µs |")
        print(f"| **no-op: (b) / (a)** (target 5x) | | **{b.eps / a.eps:.1f}x** | |")
        print(f"| **lifecycle: (d) / (c)** (target 100x) | | **{d.eps / c.eps:.1f}x** | |")
        print()
        print("rounds (a):", ", ".join(fmt(x.eps) for x in plan_noop))
        print("rounds (b):", ", ".join(fmt(x.eps) for x in pkg_noop))
        pairs = zip(plan_noop, pkg_noop, strict=True)
        print("(b)/(a) per round:", ", ".join(f"{y.eps / x.eps:.1f}x" for x, y in pairs))
        print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        print(
            f"stand-in: started {stats['started']}, completed {stats['completed']}, "
            f"failed {stats['failed']} (expected {m + n} each of started/completed)"
        )
    finally:
        standin.close()
        stack.close()


if __name__ == "__main__":
    asyncio.run(main())
