"""`curves.png` in a run's workdir: its training curves at a glance, redrawn at each evaluation.

Read back from `metrics.jsonl` (so a resumed run draws its whole history), one panel per
curve: stage 1 shows the training loss, the held-out PSNR and the held-out codebook usage
against steps; stage 2 the training loss, the held-out loss and the held-out accuracy.
Drawn with matplotlib's object API on the Agg canvas: no display, no global pyplot state.
"""

import io
import json
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitvq import paths

CURVES_FILE = "curves.png"
# (metrics.jsonl key, panel title) of each stage's panels.
STAGE1_PANELS = (
    ("train/loss/total", "training loss"),
    ("eval/psnr", "held-out PSNR (dB)"),
    ("eval/codebook_usage", "held-out codebook usage"),
)
STAGE2_PANELS = (
    ("train/loss", "training loss (nats/token)"),
    ("eval/loss", "held-out loss (nats/token)"),
    ("eval/accuracy", "held-out next-token accuracy"),
)


def read_series(text: str, keys: Sequence[str]) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) of each key over the rows of a metrics.jsonl text (finite values;
    a resumed run's repeated steps keep their last value)."""
    series: dict[str, dict[int, float]] = {key: {} for key in keys}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash: skip it
            continue
        for key in keys:
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                series[key][int(row["step"])] = float(value)
    return {key: (sorted(s), [s[k] for k in sorted(s)]) for key, s in series.items()}


def draw(series, panels, title: str) -> bytes:
    """The PNG bytes of one row of panels."""
    fig = Figure(figsize=(4.0 * len(panels), 3.0), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, name) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        steps, values = series.get(key, ([], []))
        marker = "o" if key.startswith("eval/") else None
        ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not steps:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_curves(workdir: str, panels, title: str) -> str:
    """Draws `workdir`/curves.png from `workdir`/metrics.jsonl; returns its path."""
    source = paths.join(workdir, "metrics.jsonl")
    text = paths.read_text(source) if paths.exists(source) else ""
    path = paths.join(workdir, CURVES_FILE)
    png = draw(read_series(text, [key for key, _ in panels]), panels, title)
    paths.write_bytes(path, png)
    return path
