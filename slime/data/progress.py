"""Progress of data preparation as periodic log lines.

Log lines, not a redrawn bar: inside a Ray actor stdout/stderr are forwarded to the
driver line by line, so a bar that redraws in place shows nothing useful there, while a
line every few seconds (rows/s, tokens/s, ETA) and a final summary read well in the
driver's log, a terminal and a CI log alike.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

__all__ = ["ProgressLog", "format_seconds"]

DEFAULT_INTERVAL_S = 10.0


def format_seconds(s: float) -> str:
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLog:
    """``update(rows, tokens)`` after each chunk; a line at most every ``interval_s`` seconds."""

    def __init__(self, desc: str, total: int, workers: int = 1, enabled: bool = True,
                 interval_s: float | None = None, clock=time.monotonic):
        self.desc, self.total, self.workers, self.enabled = desc, total, workers, enabled
        self.interval_s = DEFAULT_INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self.start = self.last = clock()
        self.rows = self.tokens = 0
        self._mark = (self.start, 0, 0)  # time, rows, tokens at the previous line
        if enabled:
            logger.info("%s: %d rows, %d worker process%s", desc, total, workers, "" if workers == 1 else "es")

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        now = self.clock()
        if self.enabled and now - self.last >= self.interval_s and self.rows < self.total:
            self.last = now
            logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """Rates over the last interval (worker start-up does not drag them down), ETA from them."""
        t0, rows0, tokens0 = self._mark
        self._mark = (now, self.rows, self.tokens)
        span = max(now - t0, 1e-9)
        rate = (self.rows - rows0) / span
        eta = format_seconds((self.total - self.rows) / rate) if rate > 0 else "?"
        pct = 100.0 * self.rows / max(self.total, 1)
        return (f"{self.desc}: {self.rows:,}/{self.total:,} rows ({pct:.0f}%), {rate:,.0f} rows/s, "
                f"{(self.tokens - tokens0) / span:,.0f} tokens/s, elapsed {format_seconds(now - self.start)}, ETA {eta}")

    def done(self, report=None) -> float:
        """Log the totals (and the report summary is logged by the caller); returns seconds taken."""
        elapsed = max(self.clock() - self.start, 1e-9)
        if self.enabled:
            kept = f", {report.samples:,} samples kept" if report is not None else ""
            logger.info("%s: done, %s rows in %s (%s rows/s, %s tokens/s)%s", self.desc, f"{self.rows:,}",
                        format_seconds(elapsed), f"{self.rows / elapsed:,.0f}", f"{self.tokens / elapsed:,.0f}", kept)
        return elapsed
