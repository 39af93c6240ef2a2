"""Classifier-based rejection sampling (vitvq.rejection, Sampler.sample(acceptance_rate=...)).

The selection rules are checked against brute force on random scores; the sampler end to end
on a fresh-init tiny VIM bundle (no training: rejection only needs candidates to rank), with
a classifier that records every candidate it scores.
"""

import json
import math

import numpy as np
import pytest
import safetensors.numpy
import scipy.special
from bundle_helpers import make_vim_bundle
from inception_helpers import random_inception_params

import vitvq
from vitvq import rejection
from vitvq.errors import BundleError, InputError, VitvqError
from vitvq.sample import rejection_knobs

NUM_CLASSES = 10


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.3, 0.25, 0.07])
def test_candidate_counts_per_class(rate):
    labels = np.array([3, 1, 3, 3, 0, 1], np.int32)
    cands = rejection.candidate_labels(labels, rate)
    for c, n in ((0, 1), (1, 2), (3, 3)):
        assert np.sum(cands == c) == math.ceil(round(n / rate, 9))
    assert np.all(np.diff(cands) >= 0)  # grouped by class


def test_keep_best_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.integers(0, 4, size=rng.integers(1, 12)).astype(np.int32)
        rate = rng.choice([0.2, 0.5, 0.8, 1.0])
        cands = rejection.candidate_labels(labels, rate)
        scores = rng.integers(0, 5, size=len(cands)).astype(np.float64)  # many ties
        picked = rejection.keep_best(scores, cands, labels)
        assert np.array_equal(cands[picked], labels)
        assert len(set(picked.tolist())) == len(picked)  # no candidate kept twice
        for c in np.unique(labels):
            pool = [i for i in range(len(cands)) if cands[i] == c]
            # Brute force: best score first, the earlier candidate first among equals.
            want = sorted(pool, key=lambda i: (-scores[i], i))[: np.sum(labels == c)]
            assert picked[labels == c].tolist() == want


def test_target_scores_are_log_softmax_and_follow_the_class_map():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 7)) * 3
    targets = np.array([0, 2, 1, 2, 0])
    ref = scipy.special.log_softmax(logits, axis=1)
    got = rejection.target_scores(logits, targets, 3, np.array([6, 0, 3]))
    np.testing.assert_allclose(got, ref[np.arange(5), [6, 3, 0, 3, 6]], rtol=1e-12)
    same = rejection.target_scores(logits[:, :3], targets, 3, None)
    np.testing.assert_allclose(same, scipy.special.log_softmax(logits[:, :3], 1)[range(5), targets])
    with pytest.raises(InputError, match="scores 7 classes but the bundle's VIM has 3"):
        rejection.target_scores(logits, targets, 3, None)
    with pytest.raises(InputError, match=r"shape \[5, num_classes\]"):
        rejection.target_scores(logits[:4], targets, 7, None)
    with pytest.raises(InputError, match="class map must hold 3 integers"):
        rejection.target_scores(logits, targets, 3, np.array([0, 1, 7]))
    with pytest.raises(InputError, match="non-finite"):
        rejection.target_scores(np.full((5, 3), np.nan), targets, 3, None)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "half", True, None])
def test_acceptance_rate_outside_0_1_is_refused(bad):
    with pytest.raises(InputError, match=r"acceptance_rate must be in \(0, 1\]"):
        rejection.check_rate(bad)


def test_read_class_map(tmp_path):
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps([4, 0, 2]))
    assert rejection.read_class_map(as_json, None).tolist() == [4, 0, 2]
    pbtxt = tmp_path / "labels.pbtxt"
    pbtxt.write_text(
        'entry {\n  target_class: 449\n  target_class_string: "n01440764"\n}\n'
        'entry {\n  target_class: 450\n  target_class_string: "n01443537"\n}\n'
    )
    got = rejection.read_class_map(pbtxt, ["n01443537", "n01440764"])
    assert got.tolist() == [450, 449]
    with pytest.raises(InputError, match="no entry for 1 of the bundle's classes"):
        rejection.read_class_map(pbtxt, ["n01440764", "n99999999"])
    with pytest.raises(InputError, match="does not record its class names"):
        rejection.read_class_map(pbtxt, None)
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    with pytest.raises(InputError, match="neither a JSON list of integers nor a label map"):
        rejection.read_class_map(junk, None)
    with pytest.raises(InputError, match="does not exist"):
        rejection.read_class_map(tmp_path / "nope.json", None)


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    """A bundle with a fresh-init tiny tokenizer (32x32, 64 codes) and a 10-class VIM."""
    return vitvq.load_sampler(make_vim_bundle(tmp_path_factory.mktemp("rejection") / "bundle"))


class Recorder:
    """A classifier that scores by mean brightness per class band, recording what it saw."""

    def __init__(self, num_classes=NUM_CLASSES):
        self.num_classes = num_classes
        self.images, self.logits = [], []

    def __call__(self, images):
        assert images.dtype == np.uint8 and images.ndim == 4
        x = images.astype(np.float64).reshape(len(images), -1)
        features = np.stack([x[:, c::7].mean(1) for c in range(self.num_classes)], axis=1)
        logits = (features - features.mean(1, keepdims=True)) / 8.0
        self.images.append(images)
        self.logits.append(logits)
        return logits


def test_rejection_keeps_the_best_fraction_in_order(sampler):
    labels = [2, 5, 2, 2, 5, 7]
    clf = Recorder()
    images = sampler.sample(
        6, labels, seed=4, acceptance_rate=0.5, classifier=clf, candidate_batch=5
    )
    seen = np.concatenate(clf.images)
    logits = np.concatenate(clf.logits)
    # Candidates: 2 per requested sample, grouped by class (2: 6, 5: 4, 7: 2), in batches of 5.
    assert len(seen) == 12 and [len(b) for b in clf.images] == [5, 5, 2]
    cand_labels = np.repeat([2, 5, 7], [6, 4, 2])
    scores = scipy.special.log_softmax(logits, axis=1)[np.arange(12), cand_labels]
    for c in (2, 5, 7):
        pool = np.flatnonzero(cand_labels == c)
        best = pool[np.argsort(-scores[pool], kind="stable")][: labels.count(c)]
        got = images[[i for i, label in enumerate(labels) if label == c]]
        np.testing.assert_array_equal(got, seen[best])  # kept: the best, best first
    # Deterministic: same seed and batch, same images; another seed, other candidates.
    again = sampler.sample(
        6, labels, seed=4, acceptance_rate=0.5, classifier=Recorder(), candidate_batch=5
    )
    np.testing.assert_array_equal(images, again)
    other = Recorder()
    sampler.sample(6, labels, seed=5, acceptance_rate=0.5, classifier=other, candidate_batch=5)
    assert not np.array_equal(np.concatenate(other.images), seen)


def test_rate_one_with_a_classifier_keeps_the_plain_draw_per_class(sampler):
    clf = Recorder()
    kept = sampler.sample_codes(
        4, 3, seed=2, acceptance_rate=1.0, classifier=clf, candidate_batch=4
    )
    plain = sampler.sample_codes(4, 3, seed=2)
    # One candidate per sample, drawn as one batch with the first key of the seed: the same
    # codes, reordered best first.
    assert len(np.concatenate(clf.images)) == 4
    assert sorted(map(bytes, kept)) == sorted(map(bytes, plain))


def test_rejection_refuses_bad_requests(sampler):
    with pytest.raises(InputError, match="scores 7 classes but the bundle's VIM has 10"):
        sampler.sample(2, 1, acceptance_rate=0.5, classifier=Recorder(7))
    called = []

    def untyped(images):  # no num_classes attribute: caught after the first batch
        called.append(len(images))
        return np.zeros((len(images), 1000))

    with pytest.raises(InputError, match="scores 1000 classes but the bundle's VIM has 10"):
        sampler.sample(2, 1, acceptance_rate=0.5, classifier=untyped)
    assert called == [4]
    with pytest.raises(InputError, match="needs a classifier"):
        sampler.sample(2, 1, acceptance_rate=0.5)
    with pytest.raises(InputError, match="give class_labels"):
        sampler.sample(2, None, acceptance_rate=0.5, classifier=Recorder())
    with pytest.raises(InputError, match=r"acceptance_rate must be in \(0, 1\]"):
        sampler.sample(2, 1, acceptance_rate=2.0, classifier=Recorder())
    with pytest.raises(InputError, match="candidate batch size"):
        sampler.sample(2, 1, acceptance_rate=0.5, classifier=Recorder(), candidate_batch=0)
    mapped = sampler.sample(
        2, 1, acceptance_rate=0.5, classifier=Recorder(12), class_map=np.arange(2, 12)
    )
    assert mapped.shape == (2, 32, 32, 3)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception_fid.safetensors"
    safetensors.numpy.save_file(random_inception_params(), str(path))
    return path


def test_command_line_knobs_are_checked_before_sampling(sampler, inception_file, tmp_path):
    """`python -m vitvq.sample`'s rejection flags (the exit-2 path is tested on the CLI in
    test_train_stage2)."""
    assert rejection_knobs(sampler, 1.0, None, None) == {}
    for rate, clf, classes, message in (
        (0.0, None, None, "acceptance_rate must be in"),
        (0.5, None, None, "needs --classifier"),
        (1.0, None, "map.json", "--classifier_classes needs --classifier"),
        (0.5, str(tmp_path / "nope.safetensors"), None, "does not exist"),
        (0.5, str(inception_file), None, "scores 1008 classes but the bundle's VIM has 10"),
    ):
        with pytest.raises(VitvqError, match=message):
            rejection_knobs(sampler, rate, clf, classes)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(BundleError, match="cannot read the InceptionV3 weights"):
        rejection_knobs(sampler, 0.5, str(junk), None)
    short = tmp_path / "short.json"
    short.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(InputError, match="class map must hold 10 integers"):
        rejection_knobs(sampler, 0.5, str(inception_file), str(short))


def test_inception_scores_the_candidates(sampler, inception_file, tmp_path):
    """The FID InceptionV3 (random weights here) as the classifier, through a class map."""
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(list(range(100, 110))))
    knobs = rejection_knobs(sampler, 0.5, str(inception_file), str(mapping))
    images = sampler.sample(2, [3, 8], seed=0, **knobs)
    assert images.shape == (2, 32, 32, 3)
    # The two kept are each the better of their class's two candidates under Inception.
    candidates = sampler.sample(2, [3, 3], seed=0)  # class 3's two candidates: the first batch
    logits = knobs["classifier"](candidates)
    scores = scipy.special.log_softmax(logits.astype(np.float64), axis=1)[:, 103]
    np.testing.assert_array_equal(images[0], candidates[int(np.argmax(scores))])
