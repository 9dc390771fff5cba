"""The XZepr consumer: the Rust pipeline, with handlers on your asyncio loop.

Rust owns Kafka (one poll thread), decoding, the lanes that keep the ordering
mode, the offsets and the lifecycle reporter. Each event whose lane may run is
handed to this loop and run as an asyncio task (up to ``max_in_flight`` at
once); its answer goes back to Rust, which posts ``completed``/``failed`` and
commits the offset once it and every earlier one are finished and acknowledged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from enum import Enum
from typing import Any

from . import _native
from .client import XzeprClient
from .config import KafkaConsumerConfig
from .errors import XzeprConsumerError
from .message import CloudEventMessage

logger = logging.getLogger(__name__)

#: What a handler may return: None, or a dict of details for the ``completed`` post.
HandlerResult = dict[str, Any] | None
#: A handler callable: ``async def f(message)`` or a plain ``def f(message)``.
Callback = Callable[[CloudEventMessage], Awaitable[HandlerResult] | HandlerResult]

# Events taken from Rust per call: one GIL crossing converts this many.
_TAKE_MAX = 512

#: The running handler tasks, by the key the native module gave their event.
_Tasks = dict[int, asyncio.Task[None]]


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
        An exception is posted as ``failed`` (its type and message) and the
        offset still finishes: retrying is the handler's business, a poison
        message must not stall its lane.
        """


class Ordering(str, Enum):
    """What may run at once (the Rust pipeline's ordering modes)."""

    #: One event of a partition at a time, in offset order (the default).
    PER_PARTITION = "partition"
    #: One event per message key at a time, in offset order within the key.
    PER_KEY = "key"
    #: Any event as soon as there is room under ``max_in_flight``.
    UNORDERED = "unordered"


class XzeprConsumer:
    """Kafka consumer for XZepr CloudEvents messages.

    Automatic lifecycle: given ``client``, ``receiver_id`` and ``work_name``, each
    handled event is posted as ``{work_name}.started`` before its handler runs and
    ``.completed`` or ``.failed`` after; its offset is committed only once both
    posts were acknowledged. Without them, nothing is posted and an offset is
    committed once its handler returned.

    Args:
        config: Kafka settings.
        client: the XZepr client the lifecycle posts go through.
        receiver_id: the service's receiver (see
            ``XzeprClient.discover_or_create_event_receiver``).
        work_name: lifecycle events are named ``{work_name}.started`` and so on.
        work_version: the posts' version and release.
        ordering: see ``Ordering``.
        max_in_flight: most handlers running at once; past it, events wait in
            Rust (and partitions pause when its buffers fill).
        handler_timeout: seconds a handler may run; past it, its task is
            cancelled and its event posted ``failed`` with code ``timeout``
            (a sync handler in ``executor`` cannot be stopped: it runs on, but
            its outcome no longer counts). Default: no limit.
        drain_timeout: seconds a stop (or a revoke) waits for running handlers;
            those still running then are cancelled and their events replayed by
            the next run.
        commit_interval: seconds between commits of finished offsets.
        type_prefixes: only event types starting with one of these reach the
            handler (the rest are committed at once, without posts). Default: all.
        skip_own_events: skip events whose source is ``receiver_id`` (XZepr
            republishes every post, so the service would see its own).
        executor: where a *sync* handler runs. None (the default) runs it on the
            loop's thread, which suits quick, non-blocking work; give a
            ``concurrent.futures.Executor`` for blocking work. An executor that
            cannot run it (shut down, or broken like a ``BrokenProcessPool``) is
            no handler failure: the consumer stops, the events it could not run
            stay uncommitted (replayed by the next run), and ``run`` raises
            ``XzeprConsumerError`` saying why.
    """

    def __init__(
        self,
        config: KafkaConsumerConfig,
        *,
        client: XzeprClient | None = None,
        receiver_id: str | None = None,
        work_name: str | None = None,
        work_version: str = "1.0.0",
        ordering: Ordering | str = Ordering.PER_PARTITION,
        max_in_flight: int = 1024,
        handler_timeout: float | None = None,
        drain_timeout: float = 10.0,
        commit_interval: float = 1.0,
        type_prefixes: Sequence[str] = (),
        skip_own_events: bool = True,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        lifecycle = (client, receiver_id, work_name)
        if any(x is not None for x in lifecycle) and not all(x is not None for x in lifecycle):
            raise ValueError("automatic lifecycle needs client, receiver_id and work_name")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.config = config
        self._client = client
        self._receiver_id = receiver_id
        self._work_name = work_name
        self._work_version = work_version
        self._ordering = Ordering(ordering)
        self._max_in_flight = max_in_flight
        self._handler_timeout = handler_timeout
        self._drain_timeout = drain_timeout
        self._commit_interval = commit_interval
        self._type_prefixes = list(type_prefixes)
        self._skip_own_events = skip_own_events
        self._executor = executor
        self._native: _native.Consumer | None = None
        self._stop_requested = False
        self._closed = False
        self._interrupt: BaseException | None = None
        self._last_metrics: dict[str, int] = {}

    async def run(self, handler: MessageHandler, poll_timeout: float = 1.0) -> None:
        """Consume until ``stop()``, SIGINT or SIGTERM, running ``handler.handle``.

        Returns after the drain: running handlers finished (or were cancelled at
        ``drain_timeout``), finished offsets committed, lifecycle posts sent.
        ``poll_timeout`` is accepted for compatibility; polling is Rust's.

        Raises:
            XzeprConsumerError: the consumer stopped on an error (e.g. the broker
                refused the credentials, or ``executor`` cannot run handlers).
            KeyboardInterrupt: raised in a handler; re-raised after the drain.
        """
        del poll_timeout
        await self._consume(handler.handle)

    async def run_with_callback(self, callback: Callback, poll_timeout: float = 1.0) -> None:
        """As ``run``, with a callable: ``async def f(message)``, or a plain
        function (run on the loop's thread, or in ``executor`` if one was given).
        """
        del poll_timeout
        await self._consume(callback)

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

    def metrics(self) -> dict[str, int]:
        """The pipeline's counters: consumed, handled, handler_failed,
        posted_started, posted_completed, posted_failed, finished, ... (those
        of the last run once it ended)."""
        native = self._native
        if native is not None:
            self._last_metrics = native.metrics()
        return dict(self._last_metrics)

    async def _consume(self, call: Callback) -> None:
        if self._closed:
            raise RuntimeError("the consumer is closed")
        if self._native is not None:
            raise RuntimeError("the consumer is already running")
        loop = asyncio.get_running_loop()
        native = _native.Consumer(
            self.config._to_native(),
            client=self._client._client() if self._client is not None else None,
            receiver_id=self._receiver_id,
            work_name=self._work_name,
            work_version=self._work_version,
            ordering=self._ordering.value,
            max_in_flight=self._max_in_flight,
            handler_timeout=self._handler_timeout,
            drain_timeout=self._drain_timeout,
            commit_interval=self._commit_interval,
            type_prefixes=self._type_prefixes,
            skip_own_events=self._skip_own_events,
        )
        self._native = native
        if self._stop_requested:
            native.shutdown()
        restore = self._install_signal_handlers(loop)
        tasks: _Tasks = {}
        inline = self._executor is None and not _is_async(call)
        logger.info(
            "Consuming %s as group %s (%s, max_in_flight=%d)",
            self.config.topic,
            self.config.group_id,
            self._ordering.value,
            self._max_in_flight,
        )
        # Resolves once the pipeline stopped (on stop() or on an error) and
        # drained; until then the loop serves what it hands over.
        joined = native.join()
        try:
            await self._serve(native, call, inline, tasks)
        finally:
            native.shutdown()
            try:
                if not native.finished:
                    # Interrupted (cancelled): keep serving the drain, so what
                    # the pipeline hands over still runs and is committed.
                    await self._serve(native, call, inline, tasks)
                await joined
            finally:
                # What is left was abandoned by the pipeline (its offsets are
                # not committed and will be replayed).
                left = list(tasks.values())
                for t in left:
                    t.cancel()
                if left:
                    await asyncio.gather(*left, return_exceptions=True)
                self._last_metrics = native.metrics()
                self._native = None
                self._stop_requested = False
                restore()
        interrupt, self._interrupt = self._interrupt, None
        if interrupt is not None:
            raise interrupt

    async def _serve(
        self,
        native: _native.Consumer,
        call: Callback,
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
                for key, message, token in batch:
                    if inline:
                        # An earlier handler of the batch may have blocked the
                        # loop past this event's timeout.
                        if not token.abandoned:
                            self._call_inline(call, key, message, token, tasks)
                    else:
                        self._spawn(key, self._run_one(call, message, token), tasks)
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

    async def _in_executor(self, call: Callback, message: CloudEventMessage) -> Any:
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
        token.fail(name, text)

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


def _text(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in when its ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__qualname__} whose str() raised>"


def _is_async(call: Callable[..., Any]) -> bool:
    target = getattr(call, "__call__", None)  # noqa: B004 - async __call__ methods count too
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(target)
