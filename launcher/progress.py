"""Progress bars with rate and ETA for the driver's long loops (tqdm, on stderr).

On a terminal: a normal redrawn tqdm bar (refresh at most every 0.5 s).
Not on a terminal (Ray job logs, CI, `> file`): the bar stays visible in the log as plain
ASCII *lines*, one every TRELLIS_PROGRESS_INTERVAL seconds (default 10) plus the final
one, instead of carriage-return redraws that a log file would turn into one huge line.
TRELLIS_PROGRESS=0 turns bars off. Only the driver should show bars (`disable=` for others).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TextIO

from tqdm import tqdm


class _LineStream:
    """File-like wrapper turning tqdm's '\\r' redraws into whole lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


class _LogTqdm(tqdm):
    """For logs: postfix/description changes wait for the next timed refresh instead of
    each forcing a new line."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kw: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kw)

    def set_description(self, desc: str | None = None, refresh: bool = False) -> None:
        super().set_description(desc, refresh=refresh)


def progress(iterable_or_total: Iterable | int | None = None, desc: str = "",
             unit: str = "it", disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar over an iterable (or with `total=` an int, for manual `.update(n)`).
    Use as `for x in progress(items, "ingest", "file")` or
    `with progress(steps, "train", "step") as bar: ... bar.update(1); bar.set_postfix(loss=l)`.
    """
    if isinstance(iterable_or_total, int):
        iterable, total = None, iterable_or_total
    else:
        iterable, total = iterable_or_total, kwargs.pop("total", None)
    off = disable or os.environ.get("TRELLIS_PROGRESS", "1") in ("0", "false", "off")
    stream, cls = sys.stderr, tqdm
    if hasattr(stream, "isatty") and stream.isatty():
        opts = {"file": stream, "mininterval": 0.5, "dynamic_ncols": True}
    else:
        interval = float(os.environ.get("TRELLIS_PROGRESS_INTERVAL", "10"))
        opts = {"file": _LineStream(stream), "mininterval": interval, "maxinterval": interval,
                "ascii": True, "ncols": 100}
        cls = _LogTqdm
    opts.update(kwargs)
    return cls(iterable, total=total, desc=desc, unit=unit, disable=off, **opts)
