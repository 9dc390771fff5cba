"""XzeprClient against the XZepr stand-in: discovery, creation, lifecycle posts,
and the error classes for the contract's statuses."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xzepr_consumer import (
    XzeprApiError,
    XzeprAuthError,
    XzeprClient,
    XzeprClientConfig,
    XzeprClientError,
    XzeprNotFoundError,
    _bridge,
)
from xzepr_consumer.devstack import StandIn


@pytest.fixture
def api() -> Iterator[StandIn]:
    s = StandIn(token="client-token", latency_ms=0)
    yield s
    s.close()


def client_for(api: StandIn, token: str | None = None) -> XzeprClient:
    return XzeprClient(XzeprClientConfig(api.url, api.token if token is None else token))


def rid(n: int) -> str:
    return f"01PAGE{n:020d}"


def test_discover_finds_an_existing_receiver_past_the_first_page(api: StandIn) -> None:
    for i in range(120):
        api.insert_receiver(rid(i), f"other-{i}", "worker")
    # Same name, another type; same type, another name: neither matches.
    api.insert_receiver(rid(200), "svc", "scanner")
    api.insert_receiver(rid(201), "svc-2", "worker")
    api.insert_receiver(rid(202), "svc", "worker")

    async def main() -> str:
        async with client_for(api) as client:
            return await client.discover_or_create_event_receiver(
                "svc", "worker", "1.0.0", "d", {"type": "object"}
            )

    assert asyncio.run(main()) == rid(202)
    assert api.stats()["receiver_requests"] == 0, "found, not created"


def test_discover_creates_once_when_absent(api: StandIn) -> None:
    for i in range(60):
        api.insert_receiver(rid(i), f"other-{i}", "worker")

    async def main() -> tuple[str, str, str]:
        async with client_for(api) as client:
            first = await client.discover_or_create_event_receiver(
                "new-svc", "worker", "1.0.0", "d", {"type": "object"}
            )
            again = await client.discover_or_create_event_receiver(
                "new-svc", "worker", "1.0.0", "d", {"type": "object"}
            )
        async with client_for(api) as other:
            third = await other.discover_or_create_event_receiver(
                "new-svc", "worker", "1.0.0", "d", {"type": "object"}
            )
            got = await other.get_event_receiver(first)
            assert (got.name, got.receiver_type) == ("new-svc", "worker")
        return first, again, third

    first, again, third = asyncio.run(main())
    assert first == again == third
    assert api.stats()["receiver_requests"] == 1
    assert [r["id"] for r in api.receivers() if r["name"] == "new-svc"] == [first]


def test_lifecycle_posts_are_recorded(api: StandIn) -> None:
    async def main() -> None:
        async with client_for(api) as c:
            r = await c.create_event_receiver("w", "worker", "1.0.0", "d", {})
            await c.post_work_started(r, "work-1", "deploy", "1.0.0", "linux", "svc", {"a": 1})
            await c.post_work_completed(r, "work-1", "deploy", "1.0.0", "linux", "svc", True)
            await c.post_work_completed(r, "work-2", "deploy", "1.0.0", "linux", "svc", False)
            await c.post_work_failed(r, "work-3", "deploy", "1.0.0", "linux", "svc", "boom", "E1")

    asyncio.run(main())
    names = sorted(e["name"] for e in api.recorded_events())
    assert names == ["deploy.completed", "deploy.failed", "deploy.failed", "deploy.started"]
    started = next(e for e in api.recorded_events() if e["name"] == "deploy.started")
    assert started["payload"]["work_id"] == "work-1"
    assert started["payload"]["details"]["a"] == 1


def test_error_classes_map_the_statuses(api: StandIn) -> None:
    async def main() -> None:
        async with client_for(api, token="wrong") as bad:
            with pytest.raises(XzeprAuthError) as auth:
                await bad.list_event_receivers()
            assert auth.value.status_code == 401
        async with client_for(api) as c:
            with pytest.raises(XzeprNotFoundError) as nf:
                await c.get_event_receiver("01NOSUCHRECEIVER0000000000")
            assert nf.value.status_code == 404
            await c.create_event_receiver("dup", "worker", "1.0.0", "d", {})
            with pytest.raises(XzeprApiError) as dup:
                await c.create_event_receiver("dup", "worker", "1.0.0", "d", {})
            assert dup.value.status_code == 400
            assert "already exists" in dup.value.message
            with pytest.raises(XzeprApiError) as invalid:
                await c.create_event("e", "1", "1", "linux", "p", "", {}, True, "not-an-id")
            assert invalid.value.status_code == 400
            assert "event_receiver_id" in invalid.value.message
        closed = client_for(api)
        await closed.close()
        with pytest.raises(XzeprClientError):
            await closed.list_event_receivers()

    asyncio.run(main())


def test_no_answer_is_a_client_error_not_an_api_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        async with XzeprClient(XzeprClientConfig(f"http://127.0.0.1:{port}", "t")) as c:
            with pytest.raises(XzeprClientError) as info:
                await c.list_event_receivers()
            assert not isinstance(info.value, (XzeprApiError, XzeprAuthError, XzeprNotFoundError))

    asyncio.run(main())


def test_from_env_reads_the_contract_variables(
    api: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XZEPR_API_URL", api.url)
    monkeypatch.setenv("XZEPR_API_TOKEN", api.token)
    config = XzeprClientConfig.from_env()
    assert (config.base_url, config.token, config.timeout) == (api.url, api.token, 30)
    assert api.token not in repr(config)

    async def main() -> None:
        async with XzeprClient.from_env() as c:
            assert await c.list_event_receivers() == []

    asyncio.run(main())


EXIT_RIGHT_AFTER = """
import asyncio, sys
from xzepr_consumer import XzeprClient, XzeprClientConfig

async def main() -> None:
    async with XzeprClient(XzeprClientConfig(sys.argv[1], sys.argv[2])) as c:
        await asyncio.gather(*(c.list_event_receivers() for _ in range(64)))

asyncio.run(main())
"""


def test_a_process_that_exits_right_after_its_last_await_exits_cleanly(
    api: StandIn, tmp_path: Path
) -> None:
    # The answers arrive from tokio threads; one still inside Python when the
    # interpreter shuts down would be ended by CPython mid-call, which aborts
    # the process (SIGABRT) instead of exiting 0.
    for attempt in range(30):
        child = subprocess.run(
            [sys.executable, "-c", EXIT_RIGHT_AFTER, api.url, api.token],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert child.returncode == 0, (attempt, child.returncode, child.stderr)


def test_a_cancelled_call_stops_its_native_task() -> None:
    slow = StandIn(token="t", latency_ms=2000)
    try:

        async def main() -> None:
            async with XzeprClient(XzeprClientConfig(slow.url, slow.token)) as c:
                r = await c.create_event_receiver("w", "worker", "1.0.0", "d", {})
                completions = _bridge._bridges[asyncio.get_running_loop()].native
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(
                        c.post_work_started(r, "w-1", "deploy", "1.0.0", "linux", "svc"), 0.1
                    )
                # The cancellation reaches the native side on the next turn of the loop.
                await asyncio.sleep(0.05)
                assert len(completions) == 0, "the 2 s post is still running"

        asyncio.run(main())
    finally:
        slow.close()
