"""The linear probe: the optax softmax classifier, and `python -m vitvq.probe` on the digits and
on a folder of real photos, interrupted and resumed from its cached features.

The preemption test sends a real SIGTERM to the command once a few batches are cached. The
VIM is a fresh-init tiny one (tests/bundle_helpers.py): the probe's plumbing is what is
tested, against the same features computed in memory; accuracy figures live in BENCHMARKS.md.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from bundle_helpers import make_vim_bundle
from cli_helpers import REPO, run_module
from PIL import Image

import vitvq
from vitvq.cli import dataset_config
from vitvq.data import sources
from vitvq.errors import InputError
from vitvq.evaluation import linear_probe
from vitvq.evaluation.bundle_probe import probe_bundle


def test_softmax_probe_against_scikit_learn_and_its_own_choice():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 12)) * 1.5
    y = rng.integers(0, 4, size=600)
    x = centers[y] + rng.normal(size=(600, 12)) * 2.0 + 5.0  # offset: standardization matters
    result = linear_probe.softmax_probe(x[:400], y[:400], x[400:], y[400:], num_classes=4)
    mean, std = x[:400].mean(0), x[:400].std(0)
    ref = LogisticRegression(max_iter=5000).fit((x[:400] - mean) / std, y[:400])
    assert abs(result["top1"] - ref.score((x[400:] - mean) / std, y[400:])) <= 0.03
    table = result["held_out_by_weight_decay"]
    assert set(table) == set(linear_probe.WEIGHT_DECAYS)
    assert table[result["weight_decay"]] == max(table.values()) == result["held_out_top1"]
    again = linear_probe.softmax_probe(x[:400], y[:400], x[400:], y[400:], num_classes=4)
    assert again == result  # deterministic
    # A huge penalty leaves the weights near zero: near-chance, unlike the chosen one.
    flat = linear_probe.softmax_probe(
        x[:400], y[:400], x[400:], y[400:], num_classes=4, weight_decays=(1e4,)
    )
    assert flat["top1"] < result["top1"]
    with pytest.raises(InputError, match="at least 2 training and 1 test"):
        linear_probe.softmax_probe(x[:1], y[:1], x[1:2], y[1:2])


@pytest.fixture(scope="module")
def vim_bundle(tmp_path_factory):
    return make_vim_bundle(tmp_path_factory.mktemp("probe") / "bundle")


def test_probe_on_digits_matches_in_memory_features_and_resumes(vim_bundle, tmp_path, monkeypatch):
    dataset = dataset_config("digits")
    options = dict(batch_size=32, num_train=100, num_eval=40, stream=sys.stdout)
    # The reference: the same center crops, featurized in memory in one go.
    digits = sources.load_digits(32)
    sampler = vitvq.load_sampler(vim_bundle)
    block = linear_probe.probe_block(2)
    want_train = linear_probe.vim_features(sampler, np.stack(digits.train.images[:100]), block)
    want_eval = linear_probe.vim_features(sampler, np.stack(digits.eval.images[:40]), block)
    reference = linear_probe.softmax_probe(
        want_train, digits.train.labels[:100], want_eval, digits.eval.labels[:40], num_classes=10
    )

    # Interrupted after 2 of the 4 training batches, then resumed: only the rest is computed.
    calls = []
    real_call = linear_probe.VimFeatures.__call__

    def failing(self, images):
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped")
        calls.append(len(images))
        return real_call(self, images)

    workdir = tmp_path / "work"
    monkeypatch.setattr(linear_probe.VimFeatures, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        probe_bundle(str(vim_bundle), dataset, workdir=str(workdir), **options)
    cached = sorted(os.listdir(workdir / "probe_features"))
    assert cached == ["meta.json", "train_0000000.npz", "train_0000001.npz"]

    counted = []

    def counting(self, images):
        counted.append(len(images))
        return real_call(self, images)

    monkeypatch.setattr(linear_probe.VimFeatures, "__call__", counting)
    result = probe_bundle(str(vim_bundle), dataset, workdir=str(workdir), **options)
    assert counted == [32, 4, 32, 8]  # train batches 3-4 (100 = 3 x 32 + 4), eval 1-2
    assert result["block"] == block and result["num_train"] == 100 and result["num_test"] == 40
    for key in ("top1", "weight_decay", "held_out_top1"):
        assert result[key] == reference[key], key
    train = [np.load(workdir / "probe_features" / f"train_{i:07d}.npz") for i in range(4)]
    np.testing.assert_allclose(
        np.concatenate([t["features"] for t in train]), want_train, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(
        np.concatenate([t["labels"] for t in train]), digits.train.labels[:100]
    )
    # A workdir of another probe (another block) is refused, its files kept.
    with pytest.raises(InputError, match="holds the features of another probe.*block"):
        probe_bundle(str(vim_bundle), dataset, workdir=str(workdir), block=2, **options)
    assert len(os.listdir(workdir / "probe_features")) == 7


def test_probe_refuses_bad_requests(vim_bundle):
    with pytest.raises(InputError, match=r"probe block must be in \[1, 2\]"):
        probe_bundle(str(vim_bundle), dataset_config("digits"), block=3)
    with pytest.raises(InputError, match="needs class labels.*'photos'"):
        probe_bundle(str(vim_bundle), dataset_config("photos"))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Two classes of real photo crops (cat vs coffee), 12 PNGs each."""
    root = tmp_path_factory.mktemp("folder")
    for name in ("chelsea", "coffee"):
        photo = sources.load_photo(name)
        os.makedirs(root / name)
        for i in range(12):
            top, left = 10 * i, 15 * i
            crop = photo[top : top + 96, left : left + 96]
            Image.fromarray(crop).save(root / name / f"{i:02d}.png")
    return root


def _probe_cli(*args):
    return run_module("vitvq.probe", *args)


def test_probe_command_on_a_folder_dataset(vim_bundle, photo_folder, tmp_path):
    out = tmp_path / "probe.json"
    proc = _probe_cli(
        f"--bundle={vim_bundle}",
        "--dataset=folder",
        f"--path={photo_folder}",
        f"--workdir={tmp_path / 'w'}",
        f"--output={out}",
        "--batch_size=8",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["num_train"] + last["num_test"] == 24 and 0.0 <= last["top1"] <= 1.0
    assert "linear probe, VIM block 1 of 2: top-1" in proc.stdout
    for bad, message in (
        ("--block=0", "probe block must be in [1, 2]"),
        ("--dataset=photos", "needs class labels"),
    ):
        args = [f"--bundle={vim_bundle}", "--dataset=folder", f"--path={photo_folder}", bad]
        proc = _probe_cli(*args)
        assert proc.returncode == 2, (bad, proc.stderr[-1000:])
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error:") and message in line, (bad, line)


def test_probe_command_sigterm_mid_run_then_resume(vim_bundle, tmp_path):
    """A real preemption: SIGTERM once some batches are cached; the same command resumes,
    reusing them, and prints what an uninterrupted run gives."""
    workdir = tmp_path / "w"
    args = [
        f"--bundle={vim_bundle}",
        "--dataset=digits",
        "--batch_size=2",
        "--num_train=600",
        "--num_eval=40",
        f"--workdir={workdir}",
    ]
    cache = workdir / "probe_features"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitvq.probe", *args],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (cache / "train_0000003.npz").exists():
        assert proc.poll() is None and time.time() < deadline, "the probe ended first"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == -signal.SIGTERM
    done = len(list(cache.glob("train_*.npz")))
    assert 4 <= done < 300  # stopped part-way through the 300 training batches
    resumed = _probe_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"train: reusing the features of {done} of 300 batches" in resumed.stderr
    want = probe_bundle(
        str(vim_bundle), dataset_config("digits"), batch_size=2, num_train=600, num_eval=40
    )
    got = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert got["top1"] == want["top1"] and got["weight_decay"] == want["weight_decay"]
