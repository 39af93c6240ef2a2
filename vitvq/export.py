"""python -m vitvq.export --workdir=DIR [--vim_workdir=DIR2] --output=BUNDLE
                         [--dtype=float32|bfloat16] [--step=N] [--overwrite]

Writes a bundle (vitvq/bundle.py) from a stage-1 run's checkpoint: the generator's parameters
(its EMA parameters when the run kept them) and code-usage statistics, the model config, image
size, codebook size, class names where the dataset has them, and the training step. Arrays are
read whole from any sharding of the saved run; in a multi-process run every process reads and
process 0 writes while the others wait. The run's workdir is opened read-only, so a run that
is still training there is not disturbed. The workdirs may be URLs (gs://bucket/run); the
bundle may be too (written in place, bundle.json last; see `vitvq.bundle.write_bundle`).

A user error (missing workdir, no checkpoint, bad flag) prints one line and exits with 2.
"""

from __future__ import annotations

import sys

from absl import app, flags

from vitvq import cli, console, distributed, peer_watchdog, quiet
from vitvq.train.export import export


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module
    for its functions never clashes with another program's flags)."""
    flags.DEFINE_string("workdir", None, "The stage-1 (ViT-VQGAN) run's workdir.")
    flags.DEFINE_string("vim_workdir", None, "A stage-2 (VIM) run's workdir.")
    flags.DEFINE_string("output", None, "The bundle directory to write.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Tensor dtype.")
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: newest).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --output.")


def main(argv):
    cli.no_extra_args(argv)
    cli.require_flags("workdir", "output")
    quiet.startup()
    with cli.user_errors():
        distributed.initialize_if_configured()
        parts = 3 if flags.FLAGS.vim_workdir else 2  # the checkpoints read, the bundle written
        progress = console.Progress("exporting", parts, stream=sys.stderr)
        try:
            path = export(
                flags.FLAGS.workdir,
                flags.FLAGS.output,
                dtype=flags.FLAGS.dtype,
                step=flags.FLAGS.step,
                vim_workdir=flags.FLAGS.vim_workdir,
                overwrite=flags.FLAGS.overwrite,
                on_part=lambda: progress.update(progress.step + 1),
            )
        finally:
            progress.close()
        peer_watchdog.finish()  # ended normally: the other processes stop watching this one
        if path is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
