"""Progress and summary lines, printed by rank 0 only (stderr).

On a terminal the progress line is redrawn after every batch; otherwise (a batch log) at most one line is
printed every `interval` seconds (30 by default, `RSHARD_PROGRESS_INTERVAL_S` to change it)."""
from __future__ import annotations

import os
import sys
import time

LOG_INTERVAL_S = 30.0  # seconds between progress lines when stderr is not a terminal


class Progress:
    def __init__(self, total_prompts: int, total_tokens: int, enabled: bool = True, stream=None,
                 interval: float | None = None):
        self.total_prompts, self.total_tokens = total_prompts, total_tokens
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        if interval is None:
            interval = float(os.environ.get("RSHARD_PROGRESS_INTERVAL_S") or LOG_INTERVAL_S)
        self.interval = interval
        self.start = time.perf_counter()
        self.last_line = self.start  # when the last progress line was printed (not a terminal)
        self.prompts = self.tokens = self.batches = 0

    def batch_done(self, n_prompts: int, n_tokens: int) -> None:
        self.prompts += n_prompts
        self.tokens += n_tokens
        self.batches += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        left = self.total_tokens - self.tokens
        eta = left / rate if rate > 0 else 0.0
        line = (f"[rshard] batch {self.batches}: {self.prompts}/{self.total_prompts} prompts, "
                f"{self.tokens}/{self.total_tokens} tokens, {rate:,.0f} tokens/s, ETA {eta:,.0f} s")
        if self.tty:
            print("\r" + line, end="", file=self.stream, flush=True)
        elif self.start + elapsed - self.last_line >= self.interval:  # a log: one line per interval at most
            self.last_line = self.start + elapsed
            print(line, file=self.stream, flush=True)

    def finish(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.enabled and self.tty:
            print(file=self.stream)
        return elapsed


def say(message: str) -> None:
    print(f"[rshard] {message}", file=sys.stderr, flush=True)
