"""python -m vitvq.reconstruct --bundle=BUNDLE --input=FILE_OR_DIR --output=DIR [--batch_size=16]

Reconstructs images with a bundle's tokenizer (encode, then decode) and measures how close
the reconstructions are. Every regular, non-hidden file under --input is tried, whatever its
extension (vitvq.images.read_image: any mode PIL reads, EXIF orientation applied), scaled
so that its shorter side is the tokenizer's image size and center-cropped. For each image
--output gets a side-by-side PNG, `original | reconstruction`, named after the input's path
relative to --input plus ".png" (subdir/a.jpg -> subdir/a.jpg.png), and:

    metrics.csv     file, psnr, ssim (per image; uint8, data range 255)
    summary.json    num_images, num_failed, failed [{file, reason}], mean_psnr, mean_ssim

PSNR and SSIM are those of the training evaluation (vitvq.evaluation.metrics): identical
images score 100 dB, SSIM uses the Gaussian window. The work is the library's
`vitvq.reconstructing.reconstruct_images`. A file that cannot be read is reported (name
and reason) on stderr and in summary.json and skipped; the exit status is 0 as long as one
image was reconstructed. A user error (missing or corrupt bundle, missing input, no readable
image at all, bad flag) prints one `error:` line and exits with status 2.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterable, Sequence

from absl import flags

from vitvq import cli, quiet
from vitvq.reconstructing import Summary, reconstruct_images

_HELP_ARGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


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
        summary = reconstruct_images(
            flag_values["bundle"].value,
            flag_values["input"].value,
            output,
            batch_size=flag_values["batch_size"].value,
        )
    print(_format_summary(summary, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
