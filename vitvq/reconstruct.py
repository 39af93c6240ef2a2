"""python -m vitvq.reconstruct --bundle=BUNDLE --input=FILE_OR_DIR --output=DIR [--batch_size=16]

Reconstructs images with a bundle's tokenizer (encode, then decode) and measures how close
the reconstructions are. Every regular, non-hidden file under --input is tried, whatever its
extension (vitvq.images.read_image: any mode PIL reads, EXIF orientation applied), scaled
so that its shorter side is the tokenizer's image size and center-cropped. For each image
--output gets a side-by-side PNG, `original | reconstruction`, named after the input's path
relative to --input plus ".png" (subdir/a.jpg -> subdir/a.jpg.png), and:

    metrics.csv     file, psnr, ssim (per image; uint8, data range 255)
    summary.json    num_images, num_failed, failed [{file, reason}], mean_psnr, mean_ssim

A file that cannot be read is reported (name and reason) on stderr and in summary.json and
skipped; the exit status is 0 as long as one image was reconstructed. A user error (missing
or corrupt bundle, missing input, no readable image at all, bad flag) prints one `error:`
line and exits with status 2.
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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

import numpy as np
from absl import flags
from PIL import Image

from vitvq import cli, console, quiet
from vitvq.errors import DataError
from vitvq.images import fit_square, list_images, psnr, read_image

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
_HELP_ARGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
_MAX_READERS = 4  # image decoding threads (PIL releases the GIL while decoding)


def define_flags(flag_values: flags.FlagValues) -> flags.FlagValues:
    """This tool's flags, in a private FlagValues (its names may clash with other tools')."""
    flags.DEFINE_string(
        "bundle", None, "The bundle directory (python -m vitvq.export).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "input",
        None,
        "An image file, or a directory searched recursively.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output", None, "Where the side-by-side PNGs and metrics go.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "batch_size", 16, "Images reconstructed at a time.", lower_bound=1, flag_values=flag_values
    )
    return flag_values


# --- metrics -------------------------------------------------------------------------------


def ssim(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """SSIM of two uint8 RGB images [H, W, 3] (skimage, per channel, data range 255)."""
    # deferred: scikit-image, only when an image is measured
    from skimage.metrics import structural_similarity

    return float(structural_similarity(original, reconstruction, channel_axis=-1, data_range=255))


# --- the work ------------------------------------------------------------------------------


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


def _read_ahead(
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
        for (file, original), recon in zip(batch, recons, strict=False):
            out = output / names(file)
            _write_png(out, np.concatenate([original, recon], axis=1))
            summary.results.append(Result(file, out, psnr(original, recon), ssim(original, recon)))
        batch.clear()

    done = 0
    try:
        for path, image, reason in _read_ahead(paths, size, ahead=max(2 * batch_size, 8)):
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


def run(
    bundle: str | os.PathLike,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = 16,
    stream: TextIO | None = None,
) -> Summary:
    """The whole tool: returns the summary; raises DataError/BundleError for user errors."""
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


def _format_summary(summary: Summary, output: pathlib.Path) -> str:
    failed = f", {len(summary.failed)} failed" if summary.failed else ""
    return (
        f"reconstructed {summary.num_images} images into {output}{failed}: "
        f"mean PSNR {summary.mean_psnr:.2f} dB, mean SSIM {summary.mean_ssim:.4f}"
    )


def _parse(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    argv = list(argv)
    if any(arg in _HELP_ARGS for arg in argv[1:]):
        print(__doc__.strip() + "\n")
        print(flag_values.get_help())
        sys.exit(0)
    try:
        rest = flag_values(argv)
    except flags.Error as err:
        cli.exit_with(err)
    if len(rest) > 1:
        cli.exit_with(f"unexpected arguments {rest[1:]} (flags are written --name=value)")
    missing = [f"--{n}" for n in ("bundle", "input", "output") if not flag_values[n].value]
    if missing:
        cli.exit_with(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: "
            "--bundle=BUNDLE --input=FILE_OR_DIR --output=DIR"
        )


def main(argv: Iterable[str] | None = None) -> int:
    """The command line; returns 0, or exits with status 2 after one `error:` line."""
    flag_values = define_flags(flags.FlagValues())
    _parse(flag_values, list(sys.argv if argv is None else argv))
    output = pathlib.Path(flag_values["output"].value)
    quiet.startup()
    with cli.user_errors():
        summary = run(
            flag_values["bundle"].value,
            flag_values["input"].value,
            output,
            batch_size=flag_values["batch_size"].value,
        )
    print(_format_summary(summary, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
