"""Held-out reconstructions of several runs side by side, as one PNG.

    python benchmarks/side_by_side.py --out=docs/figures/full_vs_l2.png \
        "L2 only=runs/q_l2" "full loss=runs/q_full" [--count=8] [--scale=2]

Each RUN is LABEL=DIR, where DIR holds the `held_out.npz` that benchmarks/quality_photos.py
writes. The picture has one row of originals, then one row per run, over the same held-out
crops: `--count` of them, evenly spaced through the set (which runs from the smallest crops of
the first photo to the center crop of the last). Every run must have reconstructed the same
held-out set. Prints one JSON object (the file and each run's mean PSNR over the shown crops).
"""

import argparse
import json
import pathlib
import sys

import numpy as np
from PIL import Image, ImageDraw

LABEL_WIDTH = 110


def load_runs(specs):
    """[(label, images, recon)] from "LABEL=DIR" strings; a clear error for a bad one."""
    runs = []
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"error: run {spec!r} is not LABEL=DIR (e.g. 'L2 only=runs/q_l2')")
        path = pathlib.Path(folder) / "held_out.npz"
        if not path.is_file():
            raise SystemExit(
                f"error: {path} does not exist; run benchmarks/quality_photos.py --out={folder}"
            )
        with np.load(path) as f:
            runs.append((label, f["images"], f["recon"]))
    first = runs[0][1]
    for label, images, _ in runs[1:]:
        if images.shape != first.shape or not np.array_equal(images, first):
            raise SystemExit(
                f"error: run {label!r} reconstructed a different held-out set "
                f"({images.shape} vs {first.shape}); compare runs of the same image size"
            )
    return runs


def picture(runs, count: int, scale: int) -> tuple[Image.Image, list[int]]:
    images = runs[0][1]
    n, size = images.shape[0], images.shape[1]
    picks = [int(i) for i in np.linspace(0, n - 1, min(count, n)).round()]
    rows = [("original", images)] + [(label, recon) for label, _, recon in runs]
    cell = size * scale
    canvas = Image.new("RGB", (LABEL_WIDTH + cell * len(picks), cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, arr) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
        for c, i in enumerate(picks):
            tile = Image.fromarray(arr[i]).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + c * cell, r * cell))
    return canvas, picks


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10.0 * np.log10(255.0**2 / max(mse, 1e-10)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=DIR")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--count", type=int, default=8, help="held-out crops shown (>= 1)")
    parser.add_argument("--scale", type=int, default=2, help="pixel upscaling (>= 1)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.scale < 1:
        raise SystemExit("error: --count and --scale must be at least 1")
    runs = load_runs(args.runs)
    canvas, picks = picture(runs, args.count, args.scale)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    shown = {
        label: round(np.mean([psnr(images[i], recon[i]) for i in picks]), 3)
        for label, images, recon in runs
    }
    print(json.dumps({"png": str(out), "crops": picks, "psnr_shown": shown}))


if __name__ == "__main__":
    main(sys.argv[1:])
