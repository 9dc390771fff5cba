"""Awaitables the native module completes without a tokio thread taking the GIL.

Each event loop gets one ``_native.Completions``: the Rust side pushes finished
futures into it and writes a byte to its socket; the loop watches that socket
and sets the asyncio futures' results on its own thread. (A tokio thread that
called into Python itself could be ended mid-call by interpreter shutdown, which
aborts the process.)
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import weakref
from typing import Any

from . import _native

_bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBridge] = (
    weakref.WeakKeyDictionary()
)


class _LoopBridge:
    """The finished native futures of one loop, set on the loop's thread."""

    __slots__ = ("__weakref__", "_futures", "_ids", "native")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.native = _native.Completions()
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        try:
            loop.add_reader(self.native.fileno(), self._ready)
        except NotImplementedError as exc:
            raise RuntimeError(
                "xzepr_consumer needs an event loop that supports add_reader "
                "(asyncio's default selector loop on Unix)"
            ) from exc

    def pending(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[int, asyncio.Future[Any], _native.Completions]:
        future = loop.create_future()
        key = next(self._ids)
        self._futures[key] = future
        future.add_done_callback(functools.partial(self._settled, key))
        return key, future, self.native

    def _settled(self, key: int, _future: asyncio.Future[Any]) -> None:
        # Still registered: done without an answer (cancelled), so stop the work.
        if self._futures.pop(key, None) is not None:
            self.native.cancel(key)

    def _ready(self) -> None:
        for key, ok, value in self.native.drain():
            future = self._futures.pop(key, None)
            if future is None or future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def pending() -> tuple[int, asyncio.Future[Any], _native.Completions]:
    """A new asyncio future of the running loop, its key, and the loop's
    completions (called by the native module)."""
    loop = asyncio.get_running_loop()
    bridge = _bridges.get(loop)
    if bridge is None:
        bridge = _bridges[loop] = _LoopBridge(loop)
    return bridge.pending(loop)
