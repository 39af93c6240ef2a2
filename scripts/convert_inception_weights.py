"""Converts pytorch-fid's FID InceptionV3 weights to the safetensors file vitvq reads.

    python scripts/convert_inception_weights.py \
        --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.safetensors

The input is https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
pt_inception-2015-12-05-6726825d.pth (download it yourself; this script never touches the
network). It is read without torch and without an unrestricted pickle
(`vitvq.evaluation.torch_reader`); every expected tensor must be present with its expected
shape (`num_batches_tracked` is ignored). Pass the output to `--inception_weights`.
"""

import argparse
import os
import sys

import numpy as np
import safetensors.numpy

from vitvq import errors
from vitvq.evaluation import torch_reader
from vitvq.models import inception


def convert(input_path: str, output_path: str) -> dict[str, np.ndarray]:
    """Reads the PyTorch state_dict at `input_path`, writes our safetensors file; returns it."""
    if not os.path.isfile(input_path):
        raise errors.InputError(
            f"{input_path} does not exist: download pytorch-fid's FID Inception weights from "
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth and pass that file as --input."
        )
    state_dict = torch_reader.load_torch_state_dict(input_path)
    params = inception.params_from_torch_state_dict(state_dict, source=input_path)
    directory = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(directory):
        raise errors.InputError(f"output directory {directory} does not exist.")
    metadata = {"format": "vitvq-fid-inception-v3", "source": os.path.basename(input_path)}
    safetensors.numpy.save_file(params, output_path, metadata=metadata)
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--output", required=True, help="the safetensors file to write")
    args = parser.parse_args(argv)
    try:
        params = convert(args.input, args.output)
    except errors.VitvqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = sum(v.size for v in params.values())
    print(f"wrote {args.output}: {len(params)} tensors, {count:,} float32 parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
