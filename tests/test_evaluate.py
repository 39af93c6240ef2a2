"""Evaluating a bundle on a dataset (vitvq.evaluation.tokenizer_eval, python -m vitvq.evaluate)."""

import json

import numpy as np
import pytest
from bundle_helpers import make_tokenizer_bundle
from cli_helpers import run_module
from skimage.metrics import structural_similarity

import vitvq
from vitvq import data as data_lib
from vitvq.evaluation import fid as fid_lib
from vitvq.evaluation.tokenizer_eval import evaluate_tokenizer


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    path, _ = make_tokenizer_bundle(tmp_path_factory.mktemp("b") / "tok", image_size=32)
    return path


def _digits(n):
    config = {"name": "digits", "num_classes": 0}
    batches = data_lib.eval_batches(config, image_size=32, global_batch_size=8, num_examples=n)
    return list(batches)


def test_metrics_match_an_independent_computation(tiny_bundle):
    tok = vitvq.load_tokenizer(tiny_bundle)
    batches = _digits(20)  # 3 batches of 8, the last one padded
    result = evaluate_tokenizer(tok, batches)
    images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    assert len(images) == 20 and result["num_examples"] == 20
    codes = tok.encode(images)
    recon = tok.decode(codes).astype(np.float64)
    x = images.astype(np.float64)
    mse = ((x - recon) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0**2 / mse)
    assert result["psnr"] == pytest.approx(psnr.mean(), abs=1e-3)
    assert result["psnr_min"] == pytest.approx(psnr.min(), abs=1e-3)
    ssim = [
        structural_similarity(
            a,
            b,
            channel_axis=-1,
            data_range=255.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for a, b in zip(x, recon, strict=True)
    ]
    assert result["ssim"] == pytest.approx(np.mean(ssim), abs=1e-3)
    used = np.unique(codes)
    assert result["codes_used"] == len(used)
    assert result["codebook_usage"] == pytest.approx(len(used) / tok.codebook_size)
    counts = np.bincount(codes.reshape(-1), minlength=tok.codebook_size)
    p = counts[counts > 0] / counts.sum()
    assert result["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert "fid" not in result and "lpips" not in result


def test_fid_path_with_inception_weights(tiny_bundle, tmp_path, monkeypatch):
    """With a weights file, FID/IS come from the Inception features of originals and recons."""
    calls = []

    def fake_inception(images):  # stands in for load_inception's function (tested in test_fid)
        calls.append(images.copy())
        flat = images.reshape(len(images), -1).astype(np.float64)
        pool = np.stack([flat[:, i::16].mean(axis=1) for i in range(16)], axis=1)
        return {"pool": pool, "logits": pool[:, :10]}

    tok = vitvq.load_tokenizer(tiny_bundle)
    result = evaluate_tokenizer(tok, _digits(24), inception=fake_inception)
    real, fake = np.concatenate(calls[0::2]), np.concatenate(calls[1::2])
    assert len(real) == len(fake) == 24
    feats = lambda imgs: fake_inception(imgs)["pool"]  # noqa: E731
    expected = fid_lib.fid_from_features(feats(real), feats(fake))
    assert result["fid"] == pytest.approx(expected, rel=1e-9)
    assert result["inception_score"] >= 1.0


def _cli(*args):
    return run_module("vitvq.evaluate", *args, timeout=300)


def test_cli_prints_json_and_skips_fid_without_weights(tiny_bundle, tmp_path):
    out = tmp_path / "m.json"
    proc = _cli(
        f"--bundle={tiny_bundle}", "--dataset=digits", "--num_examples=10", f"--output={out}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["num_examples"] == 10 and 0 < result["codebook_usage"] <= 1
    assert "lpips" in result and "fid" not in result
    assert "FID/IS skipped" in proc.stderr
    bad = _cli(f"--bundle={tmp_path / 'missing'}", "--dataset=digits")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "missing" in bad.stderr and "Traceback" not in bad.stderr
    no_weights = _cli(
        f"--bundle={tiny_bundle}", "--dataset=digits", f"--inception_weights={tmp_path}/w"
    )
    assert no_weights.returncode == 2 and f"{tmp_path}/w" in no_weights.stderr
