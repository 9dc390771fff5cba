"""The documentation's Python, checked: every ```python block of README.md,
python/README.md and docs/ is type-checked with ``mypy --strict`` against the
installed package, and each one that is a program is run as a reader would
run it (on the embedded dev stack, or on its stdin), its output checked
against what the page says it does.

A block is named by its page and its place there (``docs/how-to/python.md#1``
is the page's first Python block). Every block is run by a test below
(``@runs``) or listed in ``NOT_RUN`` with the reason: a new block that is
neither fails the suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pytest
from conftest import Receiver, committed, dead_letter, run_until, xzepr_event

from xzepr_consumer import (
    KafkaConsumerConfig,
    RetryPolicy,
    Settings,
    XzeprClient,
    XzeprClientConfig,
    XzeprConsumer,
)
from xzepr_consumer.devstack import DevStack, committed_offsets, generate_events, produce

# The repository: the tests are in python/tests/.
ROOT = Path(__file__).resolve().parents[2]
# The pages known to hold Python, so an extractor that finds nothing fails.
KNOWN_PAGES = {
    "python/README.md",
    "docs/how-to/python.md",
    "docs/how-to/non-rust-services.md",
    "docs/how-to/batch-handlers.md",
    "docs/how-to/tracing.md",
    "docs/how-to/redrive-after-a-fix.md",
}
# How long a program gets to do what its page says, and to stop once asked.
DEADLINE_S = 120.0
STOP_S = 60.0


@dataclass(frozen=True)
class Block:
    """A ```python block: its page (relative to the repository), its place
    among the page's Python blocks (from 1), the line of its opening fence."""

    page: str
    index: int
    line: int
    code: str

    @property
    def key(self) -> str:
        return f"{self.page}#{self.index}"

    @property
    def module(self) -> str:
        """A file name for the block: its page and index, as a module name."""
        return re.sub(r"\W", "_", f"{self.page.removesuffix('.md')}_{self.index}") + ".py"


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "python" / "README.md", *sorted(ROOT.glob("docs/**/*.md"))]


def python_blocks() -> list[Block]:
    blocks: list[Block] = []
    for page in pages():
        name = page.relative_to(ROOT).as_posix()
        lines = page.read_text(encoding="utf-8").splitlines()
        fence: tuple[str, int] | None = None  # (language, line of the opening fence)
        body: list[str] = []
        for n, line in enumerate(lines, start=1):
            if not line.lstrip().startswith("```"):
                body.append(line)
                continue
            if fence is None:
                fence, body = (line.lstrip()[3:].strip(), n), []
                continue
            language, start = fence
            if language == "python":
                index = sum(b.page == name for b in blocks) + 1
                code = textwrap.dedent("\n".join(body)) + "\n"
                blocks.append(Block(name, index, start, code))
            fence = None
    return blocks


BLOCKS = python_blocks()
BY_KEY = {b.key: b for b in BLOCKS}

#: The blocks that are not run, each with the reason.
NOT_RUN: dict[str, str] = {}
#: The blocks run below, each with the test that runs it (filled by ``runs``).
RUN: dict[str, str] = {}

F = Callable[..., None]


def runs(key: str) -> Callable[[F], F]:
    """Marks the test that runs the block ``key``."""

    def mark(test: F) -> F:
        RUN[key] = test.__name__
        return test

    return mark


def block(key: str) -> Block:
    assert key in BY_KEY, f"no block {key}: the page's Python blocks are now {sorted(BY_KEY)}"
    return BY_KEY[key]


def test_the_blocks_are_found() -> None:
    assert len(BLOCKS) >= 6, [b.key for b in BLOCKS]
    missing = KNOWN_PAGES - {b.page for b in BLOCKS}
    assert not missing, f"no ```python block found in {sorted(missing)}"


def test_every_block_is_run_or_listed() -> None:
    keys = set(BY_KEY)
    neither = keys - RUN.keys() - NOT_RUN.keys()
    both = RUN.keys() & NOT_RUN.keys()
    stale = (RUN.keys() | NOT_RUN.keys()) - keys
    assert not neither, f"run by no test and not in NOT_RUN: {sorted(neither)}"
    assert not both, f"run, and listed as not run: {sorted(both)}"
    assert not stale, f"run or listed, but no such block: {sorted(stale)}"


# mypy --strict


@pytest.fixture(scope="module")
def mypy_messages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """mypy --strict over every block at once (one process, one cache), from a
    directory outside the source tree: the blocks are checked against the
    installed package. Its messages by block key, each naming the page's line."""
    where = tmp_path_factory.mktemp("doc-blocks")
    by_module = {b.module: b for b in BLOCKS}
    for name, b in by_module.items():
        (where / name).write_text(b.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    mypy = [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.10"]
    options = ["--cache-dir", str(where / ".mypy_cache"), "--no-color-output", "--no-error-summary"]
    run = subprocess.run(
        [*mypy, *options, *sorted(by_module)],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # 0: clean; 1: messages; anything else: mypy itself failed.
    assert run.returncode in (0, 1), f"mypy failed ({run.returncode}): {run.stdout}{run.stderr}"
    messages: dict[str, list[str]] = {b.key: [] for b in BLOCKS}
    at = re.compile(r"^(\S+\.py):(\d+):(.*)$")
    for line in run.stdout.splitlines():
        m = at.match(line)
        assert m and m[1] in by_module, f"a mypy message for no block: {line}"
        b = by_module[m[1]]
        messages[b.key].append(f"{b.page}:{b.line + int(m[2])}:{m[3]}")
    return messages


@pytest.mark.parametrize("key", sorted(BY_KEY))
def test_block_type_checks(key: str, mypy_messages: dict[str, list[str]]) -> None:
    found = mypy_messages[key]
    assert not found, f"{key} fails mypy --strict:\n" + "\n".join(found)


# Running the blocks


def write(b: Block, path: Path) -> Path:
    path.write_text(b.code, encoding="utf-8")
    return path


def env_for(stack: DevStack, **more: str) -> dict[str, str]:
    """This environment without its XZEPR_* and OTEL_* variables, with the stack's
    (as `xzepr-consumer dev` prints them to export) and ``more``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XZEPR_", "OTEL_"))}
    env.update(stack.env(), PYTHONUNBUFFERED="1", **more)
    return env


class Program:
    """A block run as a program, its stdout and stderr read as they come."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(path)],
            cwd=path.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(pipe, into), daemon=True)
            for pipe, into in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
        ]
        for r in self.readers:
            r.start()

    @staticmethod
    def _read(pipe: Any, into: list[str]) -> None:
        for line in pipe:
            into.append(line.rstrip("\n"))

    def output(self) -> str:
        return "stdout:\n{}\nstderr:\n{}".format("\n".join(self.stdout), "\n".join(self.stderr))

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not done():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exited ({self.proc.returncode}) before {what}\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} after {DEADLINE_S} s\n{self.output()}")
            time.sleep(0.05)

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT, then the exit status once it stopped (and its
        output is all read)."""
        self.proc.send_signal(signal.SIGINT)
        status = self.proc.wait(timeout=STOP_S)
        for r in self.readers:
            r.join(timeout=STOP_S)
        return status

    def __enter__(self) -> Program:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def posts(stack: DevStack, name: str) -> list[dict[str, Any]]:
    return [e for e in stack.api.recorded_events() if e["name"] == name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@runs("docs/how-to/python.md#1")
def test_the_python_how_to_service_runs_on_the_dev_stack(stack: DevStack, tmp_path: Path) -> None:
    events = [json.loads(v) for _, v in generate_events(20)]
    deployments = [e for e in events if e["type"].startswith("deployment.")]
    assert 0 < len(deployments) < len(events), "the service filters: some events are others"
    produce(stack.brokers, stack.topic, [(k, v) for k, v in generate_events(20)])
    program = write(block("docs/how-to/python.md#1"), tmp_path / "deployer.py")
    with Program(program, env_for(stack)) as p:
        p.wait_until(
            lambda: len(posts(stack, "deploy.completed")) >= len(deployments),
            "deploy.completed posted for each deployment",
        )
        status = p.interrupt()
        assert status == 0, p.output()
        # The page's output: a line per deployment, then the last line.
        assert sorted(p.stdout[:-1]) == sorted(
            f"deploying {e['id']} ({e['type']})" for e in deployments
        ), p.output()
        assert p.stdout[-1] == f"deployer: stopped; handled {len(deployments)}", p.output()
    details = [e["payload"]["details"] for e in posts(stack, "deploy.completed")]
    assert sorted(d["deployed"] for d in details) == sorted(e["id"] for e in deployments)
    assert not posts(stack, "deploy.failed")


@runs("python/README.md#1")
def test_the_package_readme_service_runs_on_the_dev_stack(stack: DevStack, tmp_path: Path) -> None:
    n = 10
    produce(stack.brokers, stack.topic, [(k, v) for k, v in generate_events(n)])
    port = free_port()
    program = write(block("python/README.md#1"), tmp_path / "deployer.py")
    with Program(program, env_for(stack, METRICS_ADDR=f"127.0.0.1:{port}")) as p:
        p.wait_until(
            lambda: len(posts(stack, "deploy.completed")) >= n,
            "deploy.completed posted for each event",
        )
        # The endpoints the comment names answer, on METRICS_ADDR.
        for path in ("/metrics", "/health", "/ready"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                assert r.status == 200, path
        status = p.interrupt()
        assert status == 0, p.output()
        assert p.stdout[-1] == str(len(posts(stack, "deploy.completed"))), p.output()
    assert int(p.stdout[-1]) >= n
    assert not posts(stack, "deploy.failed")


@runs("docs/how-to/non-rust-services.md#1")
def test_the_exec_program_completes_and_fails_as_the_page_says(tmp_path: Path) -> None:
    program = write(block("docs/how-to/non-rust-services.md#1"), tmp_path / "deploy.py")
    # What `run --exec` writes on stdin: the decoded event as one JSON line,
    # every attribute present (`platform_id` empty when the event has none).
    event = json.loads(generate_events(1)[0][1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("XZEPR_")}
    env["XZEPR_EVENT_ID"] = event["id"]

    def run(ev: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(program)],
            input=json.dumps(ev) + "\n",
            env=env,
            capture_output=True,
            text=True,
            timeout=STOP_S,
        )

    done = run(event)
    assert (done.returncode, done.stderr) == (0, ""), done
    assert json.loads(done.stdout) == {"deployed": event["id"]}, done

    failed = run({**event, "platform_id": ""})
    assert (failed.returncode, failed.stdout, failed.stderr) == (2, "", "no platform\n"), failed


@runs("docs/how-to/redrive-after-a-fix.md#1")
def test_the_redrive_dry_run_counts_the_dead_letters(tmp_path: Path) -> None:
    stack = DevStack(partitions=1, token="test-token", extra_topics=["xzepr.dev.events.dlq"])
    try:
        assert stack.topic == "xzepr.dev.events", "the block names this topic's dead letters"
        n, bad = 6, ("1", "4")
        produce(stack.brokers, stack.topic, [xzepr_event(i, "doc", "D", "p") for i in range(n)])
        group = f"doc-dead-letters-{time.monotonic_ns()}"
        config = KafkaConsumerConfig(
            brokers=stack.brokers, topic=stack.topic, service_name="doc", group_id=group
        )
        dead_letter(stack, config, n, bad)
        program = write(block("docs/how-to/redrive-after-a-fix.md#1"), tmp_path / "redrive.py")
        run = subprocess.run(
            [sys.executable, str(program)],
            env=env_for(stack),
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
        assert run.returncode == 0, run
        assert run.stdout == f"{ {'handler_failed': len(bad)} }\n", run
        # A dry run: nothing went back to the topic.
        assert committed_offsets(stack.brokers, group, stack.topic)[0][1] == n
    finally:
        stack.close()


@runs("docs/how-to/batch-handlers.md#1")
def test_the_batch_callback_fails_what_has_no_package(stack: DevStack) -> None:
    code = block("docs/how-to/batch-handlers.md#1")
    namespace: dict[str, object] = {}
    exec(compile(code.code, code.key, "exec"), namespace)
    consume = cast(Callable[[XzeprConsumer], Awaitable[None]], namespace["consume"])
    n = 12
    messages = [xzepr_event(i, "load", "B", "" if i % 4 == 0 else "pkg") for i in range(n)]
    produce(stack.brokers, stack.topic, [(k, v) for k, v in messages])
    without = n // 4

    async def main() -> None:
        client = XzeprClient(XzeprClientConfig(stack.api.url, stack.api.token))
        config = KafkaConsumerConfig(
            brokers=stack.brokers, topic=stack.topic, service_name="doc-batch"
        )
        # Retries on: a PermanentError must still not be retried.
        retry = RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_max=0.05)
        settings = Settings(types=["load"], batch=8, retry=retry)
        consumer = XzeprConsumer(config, client=client, work_name="load", settings=settings)
        await run_until(
            consumer,
            lambda: consume(consumer),
            lambda: len(posts(stack, "load.completed")) + len(posts(stack, "load.failed")) >= n,
        )
        assert consumer.metrics().retried == 0, consumer.metrics()

    asyncio.run(main())
    completed = [e["payload"]["details"] for e in posts(stack, "load.completed")]
    failed = [e["payload"]["details"] for e in posts(stack, "load.failed")]
    assert len(completed) == n - without and all("loaded" in d for d in completed), completed
    # A PermanentError: failed once, never retried.
    assert len(failed) == without, failed
    assert all("no package" in d["error"] for d in failed), failed


@runs("docs/how-to/tracing.md#1")
def test_the_traced_service_exports_its_spans(
    stack: DevStack, receiver: Receiver, tmp_path: Path
) -> None:
    n = 5
    events = [xzepr_event(i, "doc", "T", "p") for i in range(n)]
    produce(stack.brokers, stack.topic, [(k, v) for k, v in events])
    program = write(block("docs/how-to/tracing.md#1"), tmp_path / "deployer.py")
    env = env_for(stack, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
    with Program(program, env) as p:
        p.wait_until(
            lambda: committed(stack, "xzepr-consumer-deployer") == (n, n),
            "every event handled and committed",
        )
        status = p.interrupt()
        assert status == 0, p.output()
    # Its pipeline's spans (one `process {topic}` per event) reached the
    # receiver by the time it exited.
    exported = b"".join(receiver.bodies)
    assert f"process {stack.topic}".encode() in exported, receiver.paths
