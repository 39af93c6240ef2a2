"""python -m vitvq.reconstruct: a directory of real, odd and broken files through a tiny bundle.

The CLI runs in-process (its `main`) on one input directory holding every kind of file it
must cope with; the outputs are checked against values recomputed here independently. User
errors (missing or corrupt bundle, nothing readable, bad flags) end with one `error:` line
and exit status 2, once checked in a subprocess as users run it.
"""

import contextlib
import csv
import io
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import skimage.data
from bundle_helpers import make_tokenizer_bundle
from PIL import Image
from test_metrics import skimage_ssim

from vitvq import reconstruct
from vitvq.images import fit_square, read_image

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
BIG_SIDE = 10000  # more pixels than PIL's own decompression-bomb limit lets through silently
ASTRONAUT = skimage.data.astronaut()
CHELSEA = skimage.data.chelsea()

READABLE = [
    "rgb.jpg",
    "gray.png",
    "rgba.png",
    "palette.png",
    "cmyk.jpg",
    "gray16.png",
    "one_pixel.png",
    "big.png",
    "png_named.jpg",
    "same.jpg",
    "same.png",
    "sub/same.jpg",
]
BROKEN = ["empty.png", "truncated.jpg", "text.png"]


def write_inputs(root: pathlib.Path) -> None:
    (root / "sub").mkdir(parents=True)
    img = Image.fromarray
    img(ASTRONAUT[:300, 50:250]).save(root / "rgb.jpg", quality=90)
    img(CHELSEA).convert("L").save(root / "gray.png")
    rgba = np.dstack([CHELSEA[:120, :200], np.tile(np.linspace(0, 255, 200), (120, 1))])
    rgba[:, 90:110, 3] = 0  # a fully transparent band in the middle
    img(rgba.astype(np.uint8)).save(root / "rgba.png")
    img(ASTRONAUT[100:260, 100:400]).quantize(32).save(root / "palette.png")
    img(CHELSEA[:, 100:300]).convert("CMYK").save(root / "cmyk.jpg", quality=90)
    gray16 = (CHELSEA[:, :, 1].astype(np.uint16) * 257)[::2, ::2]  # full 16-bit range
    img(gray16).save(root / "gray16.png")
    img(ASTRONAUT[200:201, 200:201]).save(root / "one_pixel.png")
    # 10000 x 10000 real content that compresses well: a photo crop, tiled.
    big = np.tile(ASTRONAUT[150:250, 150:250], (BIG_SIDE // 100, BIG_SIDE // 100, 1))
    img(big).save(root / "big.png", compress_level=1)
    del big
    img(CHELSEA[50:150, 100:250]).save(root / "png_named.jpg", format="PNG")
    img(ASTRONAUT[:64, :64]).save(root / "same.jpg")
    img(CHELSEA[:64, :64]).save(root / "same.png")
    img(ASTRONAUT[-64:, -64:]).save(root / "sub/same.jpg")
    (root / ".hidden.png").write_bytes(b"not even looked at")
    (root / "empty.png").write_bytes(b"")
    jpeg = io.BytesIO()
    img(ASTRONAUT).save(jpeg, format="JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "text.png").write_text("this is a text file with a .png name\n")


def run_main(argv):
    """(exit status, stdout, stderr) of reconstruct.main(argv), in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = reconstruct.main(["reconstruct", *argv])
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    return lines[-1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path, _ = make_tokenizer_bundle(tmp_path_factory.mktemp("b") / "bundle", image_size=SIZE)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs") / "in"
    write_inputs(root)
    return root


@pytest.fixture(scope="module")
def result(bundle, inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "new" / "recon"  # created by the tool
    start = time.perf_counter()
    status, stdout, stderr = run_main(
        [f"--bundle={bundle}", f"--input={inputs}", f"--output={output}", "--batch_size=5"]
    )
    seconds = time.perf_counter() - start
    return {"status": status, "stdout": stdout, "stderr": stderr, "output": output, "s": seconds}


def test_exit_0_with_summary_line(result):
    assert result["status"] == 0, result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert f"reconstructed {len(READABLE)} images" in result["stdout"]
    assert f"{len(BROKEN)} failed" in result["stdout"]
    assert "mean PSNR" in result["stdout"] and "mean SSIM" in result["stdout"]
    # Not a terminal: no progress line, only one line per skipped file.
    lines = result["stderr"].splitlines()
    assert len(lines) == len(BROKEN) and all(line.startswith("skipped ") for line in lines)
    assert result["s"] < 30, f"reconstructing the test directory took {result['s']:.1f} s"


def test_side_by_side_pngs(result, inputs):
    output = result["output"]
    written = sorted(p.relative_to(output).as_posix() for p in output.rglob("*.png"))
    assert written == sorted(f"{name}.png" for name in READABLE)  # unique names
    for name in READABLE:
        pair = np.asarray(Image.open(output / f"{name}.png"))
        assert pair.shape == (SIZE, 2 * SIZE, 3) and pair.dtype == np.uint8, name
        expected = fit_square(read_image(inputs / name, max_side=SIZE), SIZE)
        np.testing.assert_array_equal(pair[:, :SIZE], expected, err_msg=name)
        if (inputs / name).read_bytes()[:2] == b"\xff\xd8":  # a JPEG
            # JPEG draft decoding (max_side) is close to decoding at full size.
            full = fit_square(read_image(inputs / name), SIZE)
            assert np.abs(full.astype(int) - expected).mean() < 4, name


def test_modes_converted_sensibly(result, inputs):
    left = lambda name: np.asarray(Image.open(result["output"] / f"{name}.png"))[:, :SIZE]
    assert np.all(left("gray.png") == left("gray.png")[..., :1])  # gray stays gray
    assert left("gray16.png").std() > 20 and left("gray16.png").max() > 150  # scaled, not 255s
    assert np.all(left("rgba.png")[:, 15:18] >= 250)  # the transparent band: white
    np.testing.assert_array_equal(
        left("one_pixel.png"), np.broadcast_to(ASTRONAUT[200, 200], (SIZE, SIZE, 3))
    )
    cmyk = left("cmyk.jpg").astype(int)
    reference = fit_square(CHELSEA[:, 100:300], SIZE)
    assert np.abs(cmyk - reference).mean() < 8  # CMYK -> RGB, not inverted or garbled
    big = left("big.png").astype(float)
    tile = fit_square(ASTRONAUT[150:250, 150:250], 1).astype(float)[0, 0]
    assert np.abs(big.mean(axis=(0, 1)) - tile).max() < 12  # 100 tiles averaged down


def psnr_uint8(a, b):
    """float64 PSNR of two uint8 images, capped at 100 dB (the library's choice)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0**2 / mse))


def test_metrics_match_independent_computation(result):
    output = result["output"]
    with open(output / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == sorted(READABLE, key=lambda n: n.split("/"))
    for row in rows:
        pair = np.asarray(Image.open(output / f"{row['file']}.png"))
        original, recon = pair[:, :SIZE], pair[:, SIZE:]
        # The training evaluation's metrics (float32): PSNR against float64 NumPy, SSIM
        # against scikit-image's Gaussian-window SSIM (Wang et al. 2004) in float64.
        assert float(row["psnr"]) == pytest.approx(psnr_uint8(original, recon), abs=1e-4)
        ssim = skimage_ssim(original, recon, data_range=255)
        assert float(row["ssim"]) == pytest.approx(ssim, abs=1e-4)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["num_images"] == len(READABLE) and summary["num_failed"] == len(BROKEN)
    assert summary["mean_psnr"] == pytest.approx(
        np.mean([float(r["psnr"]) for r in rows]), abs=1e-5
    )
    assert summary["mean_ssim"] == pytest.approx(
        np.mean([float(r["ssim"]) for r in rows]), abs=1e-5
    )


def test_broken_files_reported_by_name(result, inputs):
    summary = json.loads((result["output"] / "summary.json").read_text())
    failed = {f["file"]: f["reason"] for f in summary["failed"]}
    assert sorted(failed) == sorted(BROKEN)
    assert "empty" in failed["empty.png"]
    assert "truncated" in failed["truncated.jpg"]
    assert "not an image" in failed["text.png"]
    for name in BROKEN:
        assert f"skipped {inputs / name}: {failed[name]}" in result["stderr"]
    assert ".hidden.png" not in result["stderr"] + json.dumps(summary)


def test_single_file_input_and_rerun_overwrites(bundle, inputs, tmp_path):
    output = tmp_path / "single"
    output.mkdir()
    (output / "keep.txt").write_text("untouched")
    for _ in range(2):
        status, stdout, _ = run_main(
            [f"--bundle={bundle}", f"--input={inputs / 'sub' / 'same.jpg'}", f"--output={output}"]
        )
        assert status == 0 and "reconstructed 1 images" in stdout
    assert sorted(p.name for p in output.iterdir()) == [
        "keep.txt",
        "metrics.csv",
        "same.jpg.png",
        "summary.json",
    ]
    assert (output / "keep.txt").read_text() == "untouched"


def test_output_inside_input_is_not_read_back(bundle, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(CHELSEA[:40, :40]).save(root / "cat.png")
    for _ in range(2):
        status, stdout, _ = run_main(
            [f"--bundle={bundle}", f"--input={root}", f"--output={root / 'recon'}"]
        )
        assert status == 0 and "reconstructed 1 images" in stdout


def test_only_broken_files_exit_2(bundle, tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("hello")
    status, _, stderr = run_main(
        [f"--bundle={bundle}", f"--input={root}", f"--output={tmp_path / 'out'}"]
    )
    assert status == 2
    line = one_error_line(stderr)
    assert "no readable image" in line and "empty.png" in line and "text.jpg" in line
    assert not (tmp_path / "out").exists()


def test_corrupt_bundle_exit_2(bundle, inputs, tmp_path):
    import shutil

    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    tensors = broken / "tokenizer.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    status, _, stderr = run_main(
        [f"--bundle={broken}", f"--input={inputs / 'same.png'}", f"--output={tmp_path / 'o'}"]
    )
    assert status == 2
    line = one_error_line(stderr)
    assert str(tensors) in line and "sha256" in line


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--input=IN", "--output=OUT"], ["--bundle is required"]),
        ([], ["--bundle, --input, --output are required"]),
        (["--bundle=B", "--input=IN", "--output=OUT", "--batch_size=0"], ["batch_size"]),
        (["--bundle=B", "--input=IN", "--output=OUT", "--batch_size=x"], ["batch_size"]),
        (["--bundle=B", "--input=IN", "--output=OUT", "--colour=1"], ["colour"]),
        (["--bundle=B", "--input=IN", "--output=OUT", "extra"], ["unexpected", "extra"]),
    ],
)
def test_bad_flags_exit_2(argv, words):
    status, _, stderr = run_main(argv)
    assert status == 2
    line = one_error_line(stderr)
    assert len(stderr.strip().splitlines()) == 1, stderr
    for word in words:
        assert word in line, line


def test_missing_input_exit_2(bundle, tmp_path):
    status, _, stderr = run_main(
        [f"--bundle={bundle}", f"--input={tmp_path / 'nope'}", f"--output={tmp_path / 'o'}"]
    )
    assert status == 2 and str(tmp_path / "nope") in one_error_line(stderr)


def test_subprocess_missing_bundle_exit_2(inputs, tmp_path):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    missing = tmp_path / "no_bundle"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitvq.reconstruct",
            f"--bundle={missing}",
            f"--input={inputs / 'same.png'}",
            f"--output={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: bundle {missing} does not exist.", proc.stderr
    assert not (tmp_path / "o").exists()
