"""What a person reads while a command runs: a progress line per stage and one line per event.

On a terminal, `Progress` redraws one line in place: step/total, rate, ETA and the few
metrics that matter for the stage, at a readable precision. When stdout is not a terminal
(CI, a log file) it prints the same content as plain lines, at the log interval. `say`
prints one line (a resume, an evaluation), above the progress line when one is drawn.

The full metrics go to `metrics.jsonl` and TensorBoard, never here; absl's `--verbosity=1`
brings back the library's detailed log lines as well (see `vitvq.main`).
"""

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

# (metric key, label, format): what a stage's progress line shows of its training metrics.
Field = tuple[str, str, str]

_ACTIVE: list["Progress"] = []  # the progress line on screen, if any (say() draws above it)


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """4 s -> '0:04', 125 s -> '2:05', 3725 s -> '1:02:05'; unknown -> '?'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def number(value: Any, spec: str = ".4g") -> str:
    """A metric at a readable precision; 'nan'/'inf' as words."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return format(value, spec)


def rate_text(steps_per_second: float | None) -> str:
    if not steps_per_second:
        return "? step/s"
    if steps_per_second >= 1:
        return f"{steps_per_second:.2f} step/s"
    return f"{1 / steps_per_second:.2f} s/step"


def say(text: str, stream: TextIO | None = None) -> None:
    """Prints one line (flushed), above the progress line on a terminal."""
    stream = stream or sys.stdout
    active = _ACTIVE[-1] if _ACTIVE else None
    if active is not None and active.stream is stream and active.tty and active.drawn:
        stream.write("\r\x1b[K")
        stream.write(text + "\n")
        active.redraw()
    else:
        stream.write(text + "\n")
    stream.flush()


class Progress:
    """One stage's progress: `update(step, metrics)` each step, `close()` at the end.

    metrics: the stage's host metrics at a log step, None between them (the line keeps the
    last ones). Rate and ETA count from the first update, so the first step's compile does
    not distort them.
    """

    def __init__(
        self,
        title: str,
        total: int,
        *,
        start: int = 0,
        fields: Sequence[Field] = (),
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = 0.25,
    ):
        self.title, self.total, self.fields = title, int(total), tuple(fields)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.clock, self.min_interval = clock, min_interval
        self.step, self.metrics = int(start), {}
        self._origin: tuple[int, float] | None = None  # (step, time) of the first update
        self._step_time = math.nan  # when `step` was reached (a late metrics update keeps it)
        self._last_draw = -math.inf
        self.drawn = False
        _ACTIVE.append(self)

    def steps_per_second(self) -> float | None:
        if self._origin is None:
            return None
        steps, seconds = self.step - self._origin[0], self._step_time - self._origin[1]
        return steps / seconds if steps > 0 and seconds > 0 else None

    def line(self) -> str:
        width = len(str(self.total))
        percent = 100.0 * self.step / self.total if self.total else 100.0
        parts = [f"{self.title} {self.step:>{width}}/{self.total} {percent:3.0f}%"]
        rate = self.steps_per_second()
        parts.append(rate_text(rate))
        remaining = (self.total - self.step) / rate if rate else None
        parts.append(f"ETA {duration(remaining)}")
        shown = [
            f"{label} {number(self.metrics[key], spec)}"
            for key, label, spec in self.fields
            if key in self.metrics
        ]
        return "  ".join(parts + shown)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        now = self.clock()
        if self._origin is None:
            self._origin = (int(step), now)
        if int(step) != self.step or math.isnan(self._step_time):
            self._step_time = now
        self.step = int(step)
        if metrics is not None:
            self.metrics = dict(metrics)
        if self.tty:
            if now - self._last_draw >= self.min_interval or self.step >= self.total:
                self.redraw()
        elif metrics is not None:
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def redraw(self) -> None:
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()
        self._last_draw = self.clock()
        self.drawn = True

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
        if self in _ACTIVE:
            _ACTIVE.remove(self)


class Silent(Progress):
    """The progress of a process that does not print (every process but the first)."""

    def __init__(self, title: str = "", total: int = 0, **kwargs):
        super().__init__(title, total, tty=False, **kwargs)
        _ACTIVE.remove(self)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        self.step = int(step)

    def close(self) -> None:
        pass


def eval_line(step: int, metrics: Mapping[str, float], fields: Sequence[Field]) -> str:
    """'eval @ 1500: PSNR 24.31  SSIM 0.812 ...': the fields present in `metrics`."""
    shown = [
        f"{label} {number(metrics[key], spec)}" for key, label, spec in fields if key in metrics
    ]
    return f"eval @ {step}: " + ("  ".join(shown) if shown else "done")


class Elapsed:
    """`with Elapsed("compiling ..."):` shows the time spent on a terminal, redrawn each
    second by a background thread, and ends with the total; prints nothing elsewhere."""

    def __init__(self, text: str, stream: TextIO | None = None, tty: bool | None = None):
        self.text = text
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream) if tty is None else tty
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def _draw(self, end: str = "") -> None:
        seconds = time.monotonic() - self._start
        self.stream.write(f"\r\x1b[K{self.text} {duration(seconds)}{end}")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()

    def __enter__(self) -> "Elapsed":
        self._start = time.monotonic()
        if self.tty:
            self._draw()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._draw("\n")
