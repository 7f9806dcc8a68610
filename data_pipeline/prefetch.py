"""Prefetch: an iterator run ahead by a background thread, so the next micro-batch is read and
collated while the current step runs.

    for item in prefetched(make_items(), depth=2): ...

The thread pulls from the iterator and puts each item in a queue of `depth`; an exception the
iterator raises reaches the consumer at the item where it happened. Closing the generator (or
dropping it) stops the thread and waits for it: an iterator over a data stream must not run
on while the stream is re-positioned (a resume). numpy and torch release the GIL in their
copy loops, so the thread overlaps the step's compute instead of taking turns with it.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_END, _ERROR, _ITEM = 0, 1, 2
POLL_S = 0.05
"""How often a producer blocked on a full queue checks whether it was told to stop."""


def _produce(it: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    def put(msg: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False
    try:
        for item in it:
            if not put((_ITEM, item)):
                return
        put((_END, None))
    except BaseException as e:  # handed to the consumer, raised there
        put((_ERROR, e))
    finally:
        close = getattr(it, "close", None)
        if callable(close):
            close()


def prefetched(it: Iterator[T], depth: int = 2, name: str = "prefetch") -> Iterator[T]:
    """`it`'s items, produced up to `depth` ahead by a daemon thread (depth 0: `it` itself)."""
    if depth < 1:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(it, q, stop), name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
