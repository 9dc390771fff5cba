"""The XZepr consumer: the Rust library's pipeline run, with handlers on your
asyncio loop.

Rust owns the whole run cycle (``Pipeline::run``): Kafka (one poll thread),
decoding, the lanes that keep the ordering mode, retries, dead letters,
idempotency, offsets, the lifecycle reporter and the metrics endpoint. Each
event whose lane may run is handed to this loop and run as an asyncio task
(up to ``max_in_flight`` at once); its answer goes back to Rust, which posts
``completed``/``failed`` and commits the offset once it and every earlier one
are finished and acknowledged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import inspect
import json
import logging
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _native
from .client import XzeprClient
from .config import KafkaConsumerConfig
from .errors import PermanentError, XzeprConsumerError
from .idempotency import MemoryStore, PostgresStore
from .message import CloudEventMessage
from .observe import Health, Metrics
from .settings import (
    Adaptive,
    DeadLetter,
    Duration,
    Ordering,
    RetryPolicy,
    Settings,
    _concurrency,
    _optional_duration,
    _types,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BatchCallback",
    "BatchResult",
    "Callback",
    "HandlerResult",
    "MessageHandler",
    "Ordering",
    "XzeprConsumer",
]

#: What a handler may return: None, or a dict of details for the ``completed`` post.
HandlerResult = dict[str, Any] | None
#: A handler callable: ``async def f(message)`` or a plain ``def f(message)``.
Callback = Callable[[CloudEventMessage], Awaitable[HandlerResult] | HandlerResult]

#: One message's outcome in a batch: None or a dict of details (done), or an
#: exception instance (failed: retried per the policy, never if it is a
#: ``PermanentError``).
BatchResult = dict[str, Any] | BaseException | None
#: A batch handler: ``async def f(messages)`` or a plain ``def f(messages)``,
#: returning one ``BatchResult`` per message, in order.
BatchCallback = Callable[
    [list[CloudEventMessage]],
    Awaitable[Sequence[BatchResult]] | Sequence[BatchResult],
]

# Events taken from Rust per call: one GIL crossing converts this many.
_TAKE_MAX = 512

#: The running handler tasks, by the key the native module gave their event.
_Tasks = dict[int, asyncio.Task[None]]


class _BatchMiscount(Exception):
    """A batch handler returned a different number of results than messages."""


class _ExecutorBroken(Exception):
    """The executor cannot run the handler (not the handler's failure)."""


class MessageHandler(ABC):
    """Abstract base class for message handlers."""

    @abstractmethod
    async def handle(self, message: CloudEventMessage) -> dict[str, Any] | None:
        """Handle one CloudEvents message.

        Return None, or a dict added to the ``details`` of the ``completed``
        lifecycle post (JSON values, nested at most 128 levels: deeper, or a
        value that contains itself, fails the event with a ``ValueError``).
        An exception fails the attempt: it is retried by the retry policy
        (``Settings.retry``; by default not at all), and the last one is
        posted as ``failed`` (its type and message) and dead-lettered if a
        dead-letter topic is set; the offset still finishes, so a poison
        message never stalls its lane.
        """


@dataclass(frozen=True)
class _Reporting:
    """Where the lifecycle is reported (the pipeline finds or creates the
    receiver by name and type)."""

    client: XzeprClient
    receiver_name: str | None
    receiver_type: str
    receiver_id: str | None
    work_name: str
    work_version: str


class XzeprConsumer:
    """Kafka consumer for XZepr CloudEvents messages.

    Automatic lifecycle: given ``client``, each handled event is posted as
    ``{work_name}.started`` before its handler runs and ``.completed`` or
    ``.failed`` after, under the service's receiver (found by
    ``receiver_name`` and ``receiver_type``, or created); its offset is
    committed only once both posts were acknowledged. Without a client,
    nothing is posted and an offset is committed once its handler returned.

    The pipeline's settings come from ``settings`` (a ``Settings``, or a
    mapping of the library's ``PipelineConfig`` keys, as in the CLI's
    ``--config`` file), with the keyword arguments below over them. They are
    checked here, by the library: a refused one raises ``ConfigError``
    naming it.

    Args:
        config: Kafka settings.
        settings: every pipeline setting (see ``Settings``); default: the
            library's defaults.
        client: the XZepr client the lifecycle posts go through.
        receiver_name: the service's receiver (default: the service name).
        receiver_type: its type (default ``worker``).
        receiver_id: instead of ``receiver_name``: a known receiver, looked up
            when the run starts; the pipeline then finds it by its name and
            type (the earliest such receiver, if several share them).
        work_name: lifecycle events are named ``{work_name}.started`` and so
            on (default: the service name).
        work_version: the posts' version and release.
        idempotency: a ``MemoryStore`` or ``PostgresStore``: each event's work
            runs at most once per idempotency key (see
            ``xzepr_consumer.idempotency``).
        executor: where a *sync* handler runs. None (the default) runs it on the
            loop's thread, which suits quick, non-blocking work; give a
            ``concurrent.futures.Executor`` for blocking work. An executor that
            cannot run it (shut down, or broken like a ``BrokenProcessPool``) is
            no handler failure: the consumer stops, the events it could not run
            stay uncommitted (replayed by the next run), and ``run`` raises
            ``XzeprConsumerError`` saying why.
        ordering, max_in_flight, handler_timeout, drain_timeout,
        commit_interval, skip_own_events, retry, dead_letter, metrics_addr,
        traces: the ``Settings`` fields of the same names, over ``settings``;
            spans are on anyway while ``init_tracing()`` exports.
        type_prefixes: ``Settings.types``, over ``settings``.
    """

    def __init__(
        self,
        config: KafkaConsumerConfig,
        *,
        settings: Settings | Mapping[str, Any] | None = None,
        client: XzeprClient | None = None,
        receiver_name: str | None = None,
        receiver_type: str = "worker",
        receiver_id: str | None = None,
        work_name: str | None = None,
        work_version: str = "1.0.0",
        idempotency: MemoryStore | PostgresStore | None = None,
        executor: concurrent.futures.Executor | None = None,
        ordering: Ordering | str | None = None,
        max_in_flight: int | Adaptive | None = None,
        handler_timeout: Duration | None = None,
        drain_timeout: Duration | None = None,
        commit_interval: Duration | None = None,
        type_prefixes: Sequence[str] | None = None,
        skip_own_events: bool | None = None,
        retry: RetryPolicy | None = None,
        dead_letter: DeadLetter | None = None,
        metrics_addr: str | None = None,
        traces: bool | None = None,
    ) -> None:
        if client is None and any(x is not None for x in (receiver_name, receiver_id, work_name)):
            raise ValueError("receiver_name, receiver_id and work_name need a client to report to")
        if receiver_name is not None and receiver_id is not None:
            raise ValueError("give receiver_name or receiver_id, not both")
        self.config = config
        self._reporting = (
            None
            if client is None
            else _Reporting(
                client=client,
                receiver_name=receiver_name,
                receiver_type=receiver_type,
                receiver_id=receiver_id,
                work_name=work_name or config.service_name,
                work_version=work_version,
            )
        )
        overrides: dict[str, Any] = {
            "ordering": None if ordering is None else Ordering(ordering)._config(),
            "max_in_flight": None if max_in_flight is None else _concurrency(max_in_flight),
            "handler_timeout": _optional_duration(handler_timeout),
            "drain_timeout": _optional_duration(drain_timeout),
            "commit_interval": _optional_duration(commit_interval),
            "types": None if type_prefixes is None else _types(type_prefixes),
            "skip_own_events": skip_own_events,
            "retry": None if retry is None else retry._config(),
            "dead_letter": None if dead_letter is None else dead_letter._config(),
            "metrics_addr": metrics_addr,
            "traces": traces,
        }
        self._settings: dict[str, Any] = {
            **_base_config(settings),
            **{k: v for k, v in overrides.items() if v is not None},
        }
        # Checked by the library now (a full build, nothing started), so a
        # refused setting fails here rather than when the run starts.
        self._resolved: dict[str, Any] = json.loads(
            _native.resolve_settings(json.dumps(self._settings), config._to_native())
        )
        self._idempotency = idempotency
        self._executor = executor
        self._native: _native.Consumer | None = None
        self._stop_requested = False
        self._closed = False
        self._interrupt: BaseException | None = None
        self._last_metrics = Metrics()

    async def run(self, handler: MessageHandler) -> None:
        """Consume until ``stop()``, SIGINT or SIGTERM, running ``handler.handle``.

        Returns after the drain: running handlers finished (or were cancelled at
        ``drain_timeout``), finished offsets committed, lifecycle posts sent.

        Raises:
            XzeprConsumerError: the consumer stopped on an error (e.g. the broker
                refused the credentials, XZepr could not be reached to find the
                receiver, or ``executor`` cannot run handlers).
            KeyboardInterrupt: raised in a handler; re-raised after the drain.
        """
        await self._consume(handler.handle)

    async def run_with_callback(self, callback: Callback) -> None:
        """As ``run``, with a callable: ``async def f(message)``, or a plain
        function (run on the loop's thread, or in ``executor`` if one was given).
        """
        await self._consume(callback)

    async def run_batch(self, callback: BatchCallback) -> None:
        """As ``run_with_callback``, with a batch handler: each call gets one
        lane's run of messages (up to the ``batch`` setting, in offset order
        within its partition or key) and returns one result per message, in
        order: ``None`` or a dict of details when it was handled, an exception
        instance when it failed (retried per the retry policy, together with
        the batch's other retries; never when it is a ``PermanentError``).
        Raising, or returning a different number of results, fails every
        message of the call. Started, retries, dead letters, the terminal posts,
        idempotency and offsets stay per message.
        """
        await self._consume(callback, batch=True)

    def stop(self) -> None:
        """Ask the consumer to stop: no more fetching, then the drain. Thread-safe."""
        self._stop_requested = True
        native = self._native
        if native is not None:
            native.shutdown()
            logger.info("Consumer stop requested")

    def close(self) -> None:
        """Stop (if running) and refuse further runs."""
        self._closed = True
        self.stop()

    def metrics(self) -> Metrics:
        """The pipeline's counters: live while it runs, those of the last run
        once it ended."""
        native = self._native
        if native is not None:
            self._last_metrics = Metrics._from_native(native.metrics())
        return self._last_metrics

    def health(self) -> Health | None:
        """Whether the pipeline is alive and ready (what ``GET /health`` and
        ``GET /ready`` answer); None unless it runs."""
        native = self._native
        h = native.health() if native is not None else None
        return None if h is None else Health._from_native(h)

    @property
    def metrics_addr(self) -> str | None:
        """Where ``/metrics``, ``/health`` and ``/ready`` are served
        (``host:port``, the port bound when it was 0), while it runs."""
        native = self._native
        return None if native is None else native.metrics_addr

    def pipeline_config(self) -> dict[str, Any]:
        """The settings this consumer runs with, every default filled in, as
        the CLI's ``--print-config`` shows them."""
        return copy.deepcopy(self._resolved)

    async def _consume(self, call: Callable[..., Any], batch: bool = False) -> None:
        if self._closed:
            raise RuntimeError("the consumer is closed")
        if self._native is not None:
            raise RuntimeError("the consumer is already running")
        loop = asyncio.get_running_loop()
        reporting = await self._reporting_args()
        store = self._idempotency
        settings = self._settings
        if _native.tracing_active():
            # As the CLI: spans are made when something exports them.
            settings = {**settings, "traces": True}
        native = _native.Consumer(
            self.config._to_native(),
            json.dumps(settings),
            client=None if self._reporting is None else self._reporting.client._client(),
            reporting=reporting,
            idempotency=None if store is None else store._native,
            batch=batch,
        )
        self._native = native
        if self._stop_requested:
            native.shutdown()
        restore = self._install_signal_handlers(loop)
        tasks: _Tasks = {}
        inline = self._executor is None and not _is_async(call)
        logger.info(
            "Consuming %s as group %s (%s, max_in_flight=%s)",
            self.config.topic,
            self.config.group_id,
            self._resolved["ordering"],
            self._resolved["max_in_flight"],
        )
        # Resolves once the run ended (on stop() or on an error): the pipeline
        # drained and committed, the reporter drained; until then the loop
        # serves what it hands over.
        joined = native.join()
        try:
            await self._serve(native, call, inline and not batch, tasks)
        finally:
            native.shutdown()
            try:
                if not native.finished:
                    # Interrupted (cancelled): keep serving the drain, so what
                    # the pipeline hands over still runs and is committed.
                    await self._serve(native, call, inline and not batch, tasks)
                if not await joined:
                    logger.warning(
                        "Lifecycle posts still unsent at the deadline; their offsets "
                        "were not committed and are replayed"
                    )
            finally:
                # What is left was abandoned by the pipeline (its offsets are
                # not committed and will be replayed).
                left = list(tasks.values())
                for t in left:
                    t.cancel()
                if left:
                    await asyncio.gather(*left, return_exceptions=True)
                self._last_metrics = Metrics._from_native(native.metrics())
                self._native = None
                self._stop_requested = False
                restore()
        interrupt, self._interrupt = self._interrupt, None
        if interrupt is not None:
            raise interrupt

    async def _reporting_args(self) -> dict[str, str] | None:
        """The reporting's receiver and work; a ``receiver_id`` is looked up
        for its name and type."""
        r = self._reporting
        if r is None:
            return None
        name, receiver_type = r.receiver_name, r.receiver_type
        if r.receiver_id is not None:
            receiver = await r.client.get_event_receiver(r.receiver_id)
            name, receiver_type = receiver.name, receiver.receiver_type
        service = self.config.service_name
        return {
            "receiver_name": name or service,
            "receiver_type": receiver_type,
            "receiver_version": "1.0.0",
            "receiver_description": f"{service}: events handled by xzepr-consumer",
            "work_name": r.work_name,
            "work_version": r.work_version,
        }

    async def _serve(
        self,
        native: _native.Consumer,
        call: Callable[..., Any],
        inline: bool,
        tasks: _Tasks,
    ) -> None:
        """Takes events from Rust and runs them until the pipeline finished;
        cancels the tasks of events the pipeline gave up on."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            native.clear_wake()
            woken.set()

        fd = native.fileno()
        loop.add_reader(fd, wake)
        try:
            while True:
                # Read before taking: once finished, nothing more is parked.
                finished = native.finished
                for key in native.dropped():
                    task = tasks.get(key)
                    if task is not None:
                        # Timed out, or past a drain deadline: the outcome is
                        # decided, the handler must not go on with its work.
                        task.cancel()
                batch = native.take(_TAKE_MAX)
                if not batch:
                    if finished:
                        return
                    woken.clear()
                    await woken.wait()
                    continue
                groups: dict[int, list[tuple[int, CloudEventMessage, _native.Token]]] = {}
                for key, message, token, group in batch:
                    if group is not None:
                        # A batch's events come together, in order.
                        groups.setdefault(group, []).append((key, message, token))
                    elif inline:
                        # An earlier handler of the batch may have blocked the
                        # loop past this event's timeout.
                        if not token.abandoned:
                            self._call_inline(call, key, message, token, tasks)
                    else:
                        self._spawn(key, self._run_one(call, message, token), tasks)
                for entries in groups.values():
                    keys = [key for key, _, _ in entries]
                    work = self._run_batch(
                        call, [m for _, m, _ in entries], [t for _, _, t in entries]
                    )
                    self._spawn_group(keys, work, tasks)
                # Let the handlers run before taking more.
                await asyncio.sleep(0)
        finally:
            loop.remove_reader(fd)

    def _call_inline(
        self,
        call: Callback,
        key: int,
        message: CloudEventMessage,
        token: _native.Token,
        tasks: _Tasks,
    ) -> None:
        try:
            result = call(message)
        except (Exception, asyncio.CancelledError) as exc:
            # A sync call is cancelled by no one: a CancelledError is its own.
            self._failed(token, exc)
            return
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: stop cleanly.
            self._interrupted(exc)
            return
        if inspect.isawaitable(result):
            # A sync-looking callable returned an awaitable: await it in a task.
            self._spawn(key, self._run_one(lambda _message: result, message, token), tasks)
            return
        self._done(token, result)

    @staticmethod
    def _spawn(key: int, work: Coroutine[Any, Any, None], tasks: _Tasks) -> None:
        task = asyncio.ensure_future(work)
        tasks[key] = task
        task.add_done_callback(lambda _task: tasks.pop(key, None))

    @staticmethod
    def _spawn_group(keys: list[int], work: Coroutine[Any, Any, None], tasks: _Tasks) -> None:
        # One task for the batch, found by any of its events' keys (a dropped
        # event cancels the call, whose outcome the pipeline decided).
        task = asyncio.ensure_future(work)
        for key in keys:
            tasks[key] = task

        def forget(_task: asyncio.Task[None]) -> None:
            for key in keys:
                tasks.pop(key, None)

        task.add_done_callback(forget)

    async def _run_batch(
        self,
        call: BatchCallback,
        messages: list[CloudEventMessage],
        tokens: list[_native.Token],
    ) -> None:
        try:
            if self._executor is not None and not _is_async(call):
                results: Any = await self._in_executor(call, messages)
            else:
                results = call(messages)
            if inspect.isawaitable(results):
                results = await results
            results = list(results)
        except asyncio.CancelledError as exc:
            if any(t.abandoned for t in tokens) or self._stopping():
                raise
            for token in tokens:
                self._failed(token, exc)
            return
        except _ExecutorBroken as exc:
            self._executor_broken(exc)
            return
        except Exception as exc:
            for token in tokens:
                self._failed(token, exc)
            return
        except BaseException as exc:
            self._interrupted(exc)
            return
        if len(results) != len(tokens):
            miscount = _BatchMiscount(
                f"batch handler returned {len(results)} results for {len(tokens)} messages"
            )
            for token in tokens:
                self._failed(token, miscount)
            return
        for token, result in zip(tokens, results, strict=True):
            if isinstance(result, BaseException):
                self._failed(token, result)
            else:
                self._done(token, result)

    async def _run_one(
        self, call: Callback, message: CloudEventMessage, token: _native.Token
    ) -> None:
        # One flat coroutine per event (not one awaiting another): this is the
        # hot path, and a second frame per event shows in the no-op bench.
        try:
            if self._executor is not None and not _is_async(call):
                result: Any = await self._in_executor(call, message)
            else:
                result = call(message)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError as exc:
            if token.abandoned or self._stopping():
                # Cancelled by the consumer (the pipeline gave the event up,
                # or the stop's drain): unanswered, so the event is replayed
                # unless its outcome was already decided.
                raise
            # Raised by the handler itself: a failure like any other, so the
            # lane moves on.
            self._failed(token, exc)
            return
        except _ExecutorBroken as exc:
            self._executor_broken(exc)
            return
        except Exception as exc:
            self._failed(token, exc)
            return
        except BaseException as exc:
            self._interrupted(exc)
            return
        self._done(token, result)

    async def _in_executor(self, call: Callable[[Any], Any], message: Any) -> Any:
        """The sync ``call`` in the executor; ``_ExecutorBroken`` when the
        executor cannot run it (what ``call`` raises passes through)."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, call, message)
        except RuntimeError as exc:  # shut down; BrokenExecutor is one too
            raise _ExecutorBroken(exc) from exc
        try:
            return await future
        except concurrent.futures.BrokenExecutor as exc:
            # Its workers died (a BrokenProcessPool) or never started.
            raise _ExecutorBroken(exc) from exc

    def _stopping(self) -> bool:
        native = self._native
        return native is None or native.stopping

    def _done(self, token: _native.Token, result: Any) -> None:
        try:
            token.done(result if isinstance(result, dict) else None)
        except Exception as exc:
            # Details that are not JSON (or too deep, or a mapping that raises
            # while read): the work is reported failed, saying so.
            self._failed(token, exc)

    def _failed(self, token: _native.Token, exc: BaseException) -> None:
        # Never raises: an unanswered token would stall the event's lane.
        name = type(exc).__qualname__
        text = _text(exc)
        logger.warning(
            "Handler raised %s for %s (topic %s, partition %d, offset %d): %s",
            name,
            token.work_id,
            token.topic,
            token.partition,
            token.offset,
            text,
        )
        token.fail(name, text, isinstance(exc, PermanentError))

    def _interrupted(self, exc: BaseException) -> None:
        # The event stays unanswered (replayed); the consumer drains and run()
        # re-raises it.
        if self._interrupt is None:
            self._interrupt = exc
        self.stop()

    def _executor_broken(self, broken: _ExecutorBroken) -> None:
        # Not the handler's failure: reporting it so would commit every event
        # unprocessed. Stop with this event unanswered (held, replayed).
        cause = broken.__cause__ if broken.__cause__ is not None else broken
        if self._interrupt is None:
            logger.error("The executor cannot run handlers, stopping: %r", cause)
            error = XzeprConsumerError(
                f"the executor cannot run handlers ({type(cause).__qualname__}: "
                f"{_text(cause)}); the consumer stopped, events it did not run "
                "are not committed"
            )
            error.__cause__ = cause
            self._interrupt = error
        self.stop()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """SIGINT and SIGTERM stop the consumer gracefully while it runs (main
        thread of a Unix loop only); the previous handlers come back after."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        installed: list[Any] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            installed.append((sig, previous))

        def restore() -> None:
            for sig, previous in installed:
                loop.remove_signal_handler(sig)
                if previous is not None:
                    signal.signal(sig, previous)

        return restore


def _base_config(settings: Settings | Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``PipelineConfig`` object of ``settings``; in a mapping, the
    package's ``Ordering`` names are accepted beside the library's."""
    if settings is None:
        return {}
    if isinstance(settings, Settings):
        return settings.to_config()
    base = dict(settings)
    ordering = base.get("ordering")
    if isinstance(ordering, str):
        try:
            base["ordering"] = Ordering(ordering)._config()
        except ValueError:
            pass  # refused by the library, naming it
    return base


def _text(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in when its ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__qualname__} whose str() raised>"


def _is_async(call: Callable[..., Any]) -> bool:
    target = getattr(call, "__call__", None)  # noqa: B004 - async __call__ methods count too
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(target)
