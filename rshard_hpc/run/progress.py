"""Progress and summary lines, printed by rank 0 only (stderr).

On a terminal a progress bar is redrawn after every batch and, within a batch, at most every REDRAW_S seconds;
otherwise (a batch log) at most one plain line is printed every `interval` seconds (30 by default,
`RSHARD_PROGRESS_INTERVAL_S` to change it). `Progress` counts a job: prompts, tokens and ETA, and when generating
the prefill and every decode step with *generated* tokens/s. `Stages` shows a step that has no counts (converting
a model): its stage and the seconds it has taken."""
from __future__ import annotations

import io
import os
import sys
import threading
import time

LOG_INTERVAL_S = 30.0  # seconds between progress lines when stderr is not a terminal
REDRAW_S = 0.2  # seconds between redraws on a terminal within a batch (decode steps)
BAR_WIDTH = 20
LAUNCHER_HOPS = 2  # processes between a rank and the launcher whose terminal it writes to (hydra: proxy, mpiexec)


class _Lines:
    """Where progress lines go: redrawn in place on a terminal, one plain line per interval in a log."""

    def __init__(self, enabled: bool, stream, interval: float | None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        terminal = terminal_of(self.stream)
        self.tty = terminal is not None
        self.width = _width(self.stream, terminal) if self.tty else 0
        if interval is None:
            interval = float(os.environ.get("RSHARD_PROGRESS_INTERVAL_S") or LOG_INTERVAL_S)
        self.interval = interval
        self.start = time.perf_counter()
        self.last_line = self.start  # when the last plain line was printed (a log)
        self.last_draw = None  # when the bar was last drawn (a terminal)
        self.lock = threading.Lock()  # Stages draws from a thread too

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def show(self, line: str, bar_line: str | None = None, force: bool = False) -> None:
        """On a terminal `bar_line` (else `line`), redrawn at most every REDRAW_S s unless `force`; in a log `line`,
        when an interval has passed since the last one."""
        if self.enabled:
            with self.lock:
                self._show(line, bar_line or line, force)

    def _show(self, line: str, bar_line: str, force: bool) -> None:
        now = time.perf_counter()
        if self.tty:
            if force or self.last_draw is None or now - self.last_draw >= REDRAW_S:
                self.last_draw = now
                shown = bar_line[:self.width - 1] if self.width > 1 else bar_line  # a wrapped line is not redrawn
                print(f"\r{shown}\x1b[K", end="", file=self.stream, flush=True)
        elif now - self.last_line >= self.interval:
            self.last_line = now
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End the redrawn line (a terminal)."""
        if self.enabled and self.tty and self.last_draw is not None:
            print(file=self.stream, flush=True)


def terminal_of(stream) -> str | None:
    """The terminal `stream` shows on ("" when it is one itself), or None. A rank's stderr is a pipe from the
    launcher (mpiexec forwards a rank's output through pipes): then the terminal is the first stderr that is no
    pipe, at most LAUNCHER_HOPS processes up (hydra: rank, proxy, mpiexec; Linux /proc). A file there (a log) or
    pipes all the way (a capture) are no terminal."""
    if stream.isatty():
        return ""
    if stream is not sys.stderr:
        return None
    pid = os.getpid()
    try:
        for _ in range(LAUNCHER_HOPS + 1):
            target = os.readlink(f"/proc/{pid}/fd/2")
            if not target.startswith("pipe:"):
                return target if target.startswith(("/dev/pts/", "/dev/tty")) else None
            pid = int(_proc_stat(pid)[1])  # the parent's
    except (OSError, ValueError, IndexError):
        pass
    return None


def _width(stream, terminal: str) -> int:
    """Columns of the terminal (a longer line would wrap, and a carriage return would not redraw it)."""
    try:
        if not terminal:
            return os.get_terminal_size(stream.fileno()).columns
        fd = os.open(terminal, os.O_RDONLY | os.O_NOCTTY)
        try:
            return os.get_terminal_size(fd).columns
        finally:
            os.close(fd)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return 0  # unknown: lines are not cut


def bar(fraction: float) -> str:
    """'[#######.............]  35%'."""
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(round(fraction * BAR_WIDTH))
    return f"[{'#' * full}{'.' * (BAR_WIDTH - full)}] {100 * fraction:3.0f}%"


class Progress:
    """A job's progress: embed counts prompts and tokens a batch; generate (max_new_tokens > 0) also the prefill
    and each decode step of the batch in flight, with generated tokens/s and an ETA from the decode steps done."""

    def __init__(self, total_prompts: int, total_tokens: int, enabled: bool = True, stream=None,
                 interval: float | None = None, total_batches: int = 0, max_new_tokens: int = 0):
        self.total_prompts, self.total_tokens = total_prompts, total_tokens
        self.total_batches, self.max_new_tokens = total_batches, max_new_tokens
        self.out = _Lines(enabled, stream, interval)
        self.prompts = self.tokens = self.batches = self.generated = 0
        self.in_flight, self.step = 0, None  # generate: prompts of the batch being decoded, its step (0: prefill)

    def batch_done(self, n_prompts: int, n_tokens: int) -> None:
        """A batch is in the results file (its prompt tokens, when generating, were counted at its prefill)."""
        self.prompts += n_prompts
        self.tokens += 0 if self.max_new_tokens else n_tokens
        self.batches += 1
        self.in_flight, self.step = 0, None
        self._show(force=True)

    def generate_step(self, n_prompts: int, n_tokens: int, step: int, new_tokens: int) -> None:
        """Generation of a batch of n_prompts prompts and n_tokens prompt tokens: step 0 is its prefill, step s
        its s-th decode step, which generated new_tokens tokens."""
        if step == 0:
            self.tokens += n_tokens
        self.in_flight, self.step = n_prompts, step
        self.generated += new_tokens
        self._show(force=step == 0)

    def finish(self) -> float:
        self.out.close()
        return self.out.elapsed()

    def _show(self, force: bool) -> None:
        elapsed = self.out.elapsed()
        batch = f"batch {self.batches + (self.step is not None)}"
        batch += f"/{self.total_batches}" if self.total_batches else ""
        prompts = f"{self.prompts}/{self.total_prompts} prompts"
        if not self.max_new_tokens:
            rate = self.tokens / elapsed if elapsed > 0 else 0.0
            eta = f"{(self.total_tokens - self.tokens) / rate if rate > 0 else 0.0:,.0f} s"
            counts = f"{prompts}, {self.tokens}/{self.total_tokens} tokens, {rate:,.0f} tokens/s"
            self._draw(f"{batch}: {counts}, ETA {eta}", self.tokens / max(self.total_tokens, 1),
                       f"ETA {eta}: {counts}, {batch}", force)
            return
        done = self.prompts + (self.in_flight * self.step / self.max_new_tokens if self.step else 0.0)
        fraction = done / max(self.total_prompts, 1)
        eta = f"{elapsed * (1 - fraction) / fraction:,.0f} s" if fraction > 0 else "?"
        if self.step is not None:
            batch += f" step {self.step}/{self.max_new_tokens}" if self.step else " prefill"
        generated = f"{self.generated} tokens generated, {self.generated / max(elapsed, 1e-9):,.0f} tokens/s generated"
        self._draw(f"{batch}: {prompts}, {self.tokens}/{self.total_tokens} prompt tokens, {generated}, ETA {eta}",
                   fraction, f"ETA {eta}: {prompts}, {batch}, {generated}", force)

    def _draw(self, line: str, fraction: float, short: str, force: bool) -> None:
        """`line` in a log; on a terminal a bar of `fraction`, then `short` (the ETA first: a narrow terminal cuts
        the end)."""
        self.out.show(f"[rshard] {line}", f"[rshard] {bar(fraction)} {short}", force)


class Stages:
    """A slow step without counts (converting a model): `start` said at once (even when not enabled: it says why
    nothing else happens), then the stage and the seconds so far (redrawn every `tick_s` s on a terminal by a
    thread, a line per interval in a log), then `end` with the time taken."""

    def __init__(self, start: str, end: str, enabled: bool = True, stream=None, interval: float | None = None,
                 tick_s: float = 1.0):
        self.start_line, self.end_line, self.tick_s = start, end, tick_s
        self.out = _Lines(enabled, stream, interval)
        self.current = ""
        self.stopped = threading.Event()
        self.ticker = None

    def __enter__(self) -> "Stages":
        print(f"[rshard] {self.start_line}", file=self.out.stream, flush=True)
        self.out.start = self.out.last_line = time.perf_counter()
        if self.out.enabled:
            self.ticker = threading.Thread(target=self._tick, name="rshard-progress", daemon=True)
            self.ticker.start()
        return self

    def stage(self, name: str) -> None:
        self.current = name
        self._show(force=True)

    def __exit__(self, kind, value, tb) -> None:
        self.stopped.set()
        if self.ticker is not None:
            self.ticker.join()
        self.out.close()
        if kind is None and self.out.enabled:
            print(f"[rshard] {self.end_line} in {self.out.elapsed():.1f} s", file=self.out.stream, flush=True)

    def _tick(self) -> None:
        while not self.stopped.wait(self.tick_s):
            self._show(force=True)

    def _show(self, force: bool) -> None:
        if self.current:
            self.out.show(f"[rshard] {self.current}, {self.out.elapsed():,.0f} s", force=force)


def say(message: str) -> None:
    print(f"[rshard] {message}", file=sys.stderr, flush=True)


_IMPORTED_AT = time.monotonic()


def process_seconds() -> float:
    """Seconds since this process started (Linux /proc: interpreter start and imports included), else since
    this module was imported."""
    try:
        started_ticks = int(_proc_stat("self")[19])  # field 22: start time
        with open("/proc/uptime") as uptime:
            up = float(uptime.read().split()[0])
        return max(0.0, up - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


def _proc_stat(pid) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3 on): state, parent pid, …"""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def wall_line(started: float, batches: float, wind_down: float) -> str:
    """Where the client's wall time went: start-up (until the first batch), the batches, the wind-down."""
    total = started + batches + wind_down
    return (f"wall {total:.2f} s: start-up {started:.2f} s (Python, MPI, model, prompts, plan check), batches "
            f"{batches:.2f} s, wind-down {wind_down:.2f} s (stats, privacy report)")
