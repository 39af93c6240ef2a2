"""Reconstructing image files with a tokenizer, and how close the reconstructions are.

    summary = reconstruct_images(bundle, "photos/", "out/")   # the whole job, as the command
    summary.mean_psnr, summary.mean_ssim, summary.failed

Every regular, non-hidden file under the input is tried, whatever its extension
(`vitvq.images.read_image`), scaled so that its shorter side is the tokenizer's image size and
center-cropped; files are decoded ahead in threads while the tokenizer works. For each image
the output directory gets a side-by-side PNG, `original | reconstruction`, named after the
input's path relative to the input plus ".png", and `write_reports` writes

    metrics.csv     file, psnr, ssim (per image; uint8, data range 255)
    summary.json    num_images, num_failed, failed [{file, reason}], mean_psnr, mean_ssim

PSNR and SSIM are the library's (`vitvq.evaluation.metrics`, as the training evaluation
computes them): identical images score 100 dB, SSIM uses the Gaussian window. A file that
cannot be read is reported and skipped; no readable image at all is a DataError.
`python -m vitvq.reconstruct` is the command around it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image

from vitvq import console
from vitvq.errors import DataError
from vitvq.images import fit_square, list_images, read_image

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
_MAX_READERS = 4  # image decoding threads (PIL releases the GIL while decoding)


def image_metrics(originals: np.ndarray, reconstructions: np.ndarray) -> tuple[list, list]:
    """(PSNR in dB, SSIM) of each pair of uint8 images [N, H, W, 3] (data range 255)."""
    # deferred: JAX (vitvq.evaluation), only once images are measured
    from vitvq.evaluation import metrics

    psnr = np.asarray(metrics.psnr(originals, reconstructions, data_range=255.0))
    ssim = np.asarray(metrics.ssim(originals, reconstructions, data_range=255.0))
    return [float(v) for v in psnr], [float(v) for v in ssim]


@dataclasses.dataclass
class Result:
    file: str  # the input's path relative to --input (posix)
    output: pathlib.Path
    psnr: float
    ssim: float


@dataclasses.dataclass
class Summary:
    results: list[Result]
    failed: list[dict[str, str]]  # [{"file": ..., "reason": ...}]

    @property
    def num_images(self) -> int:
        return len(self.results)

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([r.psnr for r in self.results])) if self.results else math.nan

    @property
    def mean_ssim(self) -> float:
        return float(np.mean([r.ssim for r in self.results])) if self.results else math.nan

    def to_json(self) -> dict[str, Any]:
        finite = lambda x: x if math.isfinite(x) else None  # JSON has no inf/nan
        return {
            "num_images": self.num_images,
            "num_failed": len(self.failed),
            "failed": list(self.failed),
            "mean_psnr": finite(self.mean_psnr),
            "mean_ssim": finite(self.mean_ssim),
        }


def relative_name(path: pathlib.Path, root: pathlib.Path) -> str:
    """The posix path of `path` relative to --input (its file name when --input is a file)."""
    if root.is_dir():
        return path.relative_to(root).as_posix()
    return path.name


class _Names:
    """Output names: input relative path + ".png", made unique even on case-insensitive disks."""

    def __init__(self):
        self._used: set[str] = set()

    def __call__(self, relative: str) -> str:
        name, n = relative + ".png", 1
        while name.casefold() in self._used:
            n += 1
            name = f"{relative}~{n}.png"
        self._used.add(name.casefold())
        return name


def read_ahead(
    paths: Sequence[pathlib.Path], size: int, ahead: int
) -> Iterator[tuple[pathlib.Path, np.ndarray | None, str | None]]:
    """(path, uint8 [size, size, 3] or None, failure reason or None), in order, read in threads."""

    def load(path):
        try:
            return fit_square(read_image(path, max_side=size), size), None
        except DataError as err:
            return None, getattr(err, "reason", str(err))
        except MemoryError:
            return None, "not enough memory to decode it"

    workers = max(1, min(_MAX_READERS, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        queue = collections.deque()
        todo = iter(paths)
        for path in todo:
            queue.append((path, pool.submit(load, path)))
            if len(queue) >= ahead:
                break
        try:
            while queue:
                path, future = queue.popleft()
                following = next(todo, None)
                if following is not None:
                    queue.append((following, pool.submit(load, following)))
                yield (path, *future.result())
        finally:  # stopped early (an error): don't decode what nobody will use
            for _, future in queue:
                future.cancel()


def _write_png(path: pathlib.Path, image: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format="PNG")
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}") from None


def reconstruct_files(
    tokenizer,
    paths: Sequence[pathlib.Path],
    root: pathlib.Path,
    output: pathlib.Path,
    *,
    batch_size: int = 16,
    stream: TextIO | None = None,
) -> Summary:
    """Reconstructs `paths` (files under `root`) with `tokenizer`, writing PNGs to `output`.

    Unreadable files are reported on `stream` (default stderr) and listed in the summary's
    `failed`; `output` is created when the first image is written. metrics.csv and
    summary.json are written by `write_reports`.
    """
    stream = sys.stderr if stream is None else stream
    size = tokenizer.image_size
    names = _Names()
    summary = Summary(results=[], failed=[])
    progress = console.Progress("reconstructing", len(paths), stream=stream)
    batch: list[tuple[str, np.ndarray]] = []

    def flush():
        originals = np.stack([image for _, image in batch])
        if len(originals) < batch_size:  # one batch shape: the tokenizer compiles once
            pad = np.zeros((batch_size - len(originals), *originals.shape[1:]), np.uint8)
            originals = np.concatenate([originals, pad])
        recons = tokenizer.reconstruct(originals)
        psnrs, ssims = image_metrics(originals, recons)  # the padding's are never read
        for i, (file, original) in enumerate(batch):
            out = output / names(file)
            _write_png(out, np.concatenate([original, recons[i]], axis=1))
            summary.results.append(Result(file, out, psnrs[i], ssims[i]))
        batch.clear()

    done = 0
    try:
        for path, image, reason in read_ahead(paths, size, ahead=max(2 * batch_size, 8)):
            file = relative_name(path, root)
            if image is None:
                summary.failed.append({"file": file, "reason": reason})
                console.say(f"skipped {path}: {reason}", stream=stream)
                done += 1
                progress.update(done)
                continue
            batch.append((file, image))
            if len(batch) == batch_size:
                done += len(batch)
                flush()
                progress.update(done)
        if batch:
            done += len(batch)
            flush()
            progress.update(done)
    finally:
        progress.close()
    return summary


def write_reports(summary: Summary, output: pathlib.Path) -> None:
    """metrics.csv and summary.json in `output`."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with open(output / METRICS_FILE, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "psnr", "ssim"])
            for r in summary.results:
                writer.writerow([r.file, f"{r.psnr:.6f}", f"{r.ssim:.6f}"])
        with open(output / SUMMARY_FILE, "w") as f:
            json.dump(summary.to_json(), f, indent=2, allow_nan=False)
            f.write("\n")
    except OSError as err:
        raise DataError(f"cannot write the reports into {output}: {err.strerror or err}") from None


def _inside(path: pathlib.Path, directory: pathlib.Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def reconstruct_images(
    bundle: str | os.PathLike,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = 16,
    stream: TextIO | None = None,
) -> Summary:
    """The whole job: reconstructs every file under `input_path` with `bundle`'s tokenizer
    into `output` and writes the reports; returns the summary. Raises DataError or
    BundleError for a user's mistake."""
    root, output = pathlib.Path(input_path), pathlib.Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(f"--output={output} exists and is not a directory")
    paths = list_images(root)
    if root.is_dir() and _inside(output, root):  # don't read back our own outputs
        paths = [p for p in paths if not _inside(p, output)]
    if not paths:
        raise DataError(f"no files in --input={root} (hidden files are skipped)")

    # deferred: JAX; keeps --help and flag errors fast
    from vitvq.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(bundle)
    summary = reconstruct_files(
        tokenizer, paths, root, output, batch_size=batch_size, stream=stream
    )
    if not summary.results:
        shown = "; ".join(f"{f['file']}: {f['reason']}" for f in summary.failed[:3])
        more = len(summary.failed) - 3
        raise DataError(
            f"no readable image in --input={root}: all {len(summary.failed)} files failed "
            f"({shown}{f'; ... and {more} more' if more > 0 else ''})"
        )
    write_reports(summary, output)
    return summary
