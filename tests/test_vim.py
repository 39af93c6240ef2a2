"""VIM and sampling: KV-cache decoding, causality, filters, guidance, prefixes, meshes, sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from remat_helpers import assert_remat_changes_only_the_program

from vitvq import sampling
from vitvq.errors import ConfigError, InputError
from vitvq.models.vim import VIM, VIM_PRESETS, build_vim, drop_labels
from vitvq.models.vit import TransformerSpec

VOCAB, GRID, CLASSES = 16, 4, 5
T = GRID * GRID
TINY = TransformerSpec(width=32, depth=2, num_heads=2, mlp_dim=64, dropout=0.1)
# docs/paper.md table 2, millions of parameters (vocab 8192, 1024 tokens).
PAPER_PARAMS = {"base": 650, "large": 1697}


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module", params=[0, CLASSES], ids=["uncond", "cond"])
def setup(request):
    """(model, params, tokens [4, T], labels or None)."""
    model = VIM(vocab_size=VOCAB, grid_size=GRID, transformer=TINY, num_classes=request.param)
    tokens = jax.random.randint(jax.random.key(1), (4, T), 0, VOCAB, jnp.int32)
    labels = jnp.array([0, 1, 4, CLASSES], jnp.int32) if request.param else None
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens, labels)["params"])
    return model, params, tokens, labels


_FORWARD = {}


def _forward(model, params):
    """The jitted teacher-forced forward pass (one per fixture model, compiled once)."""
    if model not in _FORWARD:
        _FORWARD[model] = jax.jit(
            lambda p, tokens, labels: model.apply({"params": p}, tokens, labels)
        )
    return lambda tokens, labels: _FORWARD[model](params, tokens, labels)


def _greedy(model, params, labels, batch, prefix=None):
    """Greedy decoding with full forward passes, one position at a time."""
    forward = _forward(model, params)
    tokens = np.zeros((batch, T), np.int32)
    start = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        tokens[:, :start] = prefix
    for t in range(start, T):
        tokens[:, t] = np.argmax(np.asarray(forward(jnp.asarray(tokens), labels))[:, t], -1)
    return tokens


def test_kv_cache_decoding_matches_the_full_forward_pass(setup):
    model, params, tokens, labels = setup
    full = _forward(model, params)(tokens, labels)
    assert full.shape == (4, T, VOCAB) and full.dtype == jnp.float32
    first = labels if model.conditional else jnp.zeros((4,), jnp.int32)
    inputs = jnp.concatenate([first[:, None], tokens[:, :-1]], axis=1)  # the documented layout
    step = jax.jit(lambda c, x: model.apply({"params": params}, c, x, method=model.decode_step))
    cache = model.init_cache(4)
    for t in range(T):
        logits, cache = step(cache, inputs[:, t])
        np.testing.assert_allclose(
            logits, full[:, t], rtol=1e-5, atol=1e-5, err_msg=f"position {t}"
        )
    assert int(cache["index"]) == T
    # A prefill of several slots, then one slot at a time, gives the same logits too.
    prefill = jax.jit(lambda c, x: model.apply({"params": params}, c, x, method=model.decode_step))
    head, cache = prefill(model.init_cache(4), inputs[:, :5])
    np.testing.assert_allclose(head, full[:, :5], rtol=1e-5, atol=1e-5)
    logits, _ = step(cache, inputs[:, 5])
    np.testing.assert_allclose(logits, full[:, 5], rtol=1e-5, atol=1e-5)


def test_causality_and_dropout(setup):
    model, params, tokens, labels = setup
    forward = _forward(model, params)
    base = forward(tokens, labels)
    t = 6
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
    out = forward(changed, labels)
    # Slot t predicts token t from tokens < t: positions <= t are unchanged, t + 1 is not.
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
    assert not np.allclose(out[:, t + 1], base[:, t + 1])
    if model.conditional:  # the label reaches every position
        other = forward(tokens, (labels + 1) % CLASSES)
        assert not np.allclose(other[:, 0], base[:, 0])
    train = jax.jit(
        lambda k: model.apply({"params": params}, tokens, labels, train=True, rngs={"dropout": k})
    )(jax.random.key(5))
    assert not np.allclose(train, base)


def test_top_k_1_and_temperature_0_are_greedy(setup):
    model, params, _, labels = setup
    want = _greedy(model, params, labels, 4)
    got = sampling.sample_tokens(
        model, params, jax.random.key(3), batch_size=4, labels=labels, top_k=1
    )
    assert got.shape == (4, T) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    greedy = sampling.sample_tokens(
        model, params, jax.random.key(4), batch_size=4, labels=labels, temperature=0.0
    )
    np.testing.assert_array_equal(greedy, want)


def test_blocked_cache_decoding_is_greedy_too(setup, monkeypatch):
    # Cache blocks of 4 slots (T = 16): the steps of block k read blocks 0..k only; a prefix
    # of 6 starts decoding inside block 1. The same tokens as full forward passes.
    model, params, tokens, labels = setup
    monkeypatch.setattr(sampling, "CACHE_BLOCK", 4)
    for prefix in (None, tokens[:, :6]):
        got = sampling.sample_tokens(
            model, params, jax.random.key(3), batch_size=4, labels=labels, top_k=1, prefix=prefix
        )
        want = _greedy(model, params, labels, 4, None if prefix is None else np.asarray(prefix))
        np.testing.assert_array_equal(got, want)
    with pytest.raises(InputError, match="not a multiple of 5"):
        VIM.split_cache(model.init_cache(2), 5)


def test_completion_keeps_the_prefix_and_continues_greedily(setup):
    model, params, tokens, labels = setup
    prefix = tokens[:, :6]
    got = sampling.sample_tokens(
        model, params, jax.random.key(3), batch_size=4, labels=labels, top_k=1, prefix=prefix
    )
    np.testing.assert_array_equal(got[:, :6], prefix)
    np.testing.assert_array_equal(got, _greedy(model, params, labels, 4, np.asarray(prefix)))
    whole = sampling.sample_tokens(
        model, params, jax.random.key(3), batch_size=4, labels=labels, prefix=tokens
    )
    np.testing.assert_array_equal(whole, tokens)


def test_seeds_are_deterministic(setup):
    model, params, _, labels = setup
    kw = dict(batch_size=4, labels=labels, top_p=0.9, top_k=12, temperature=1.5)
    a = sampling.sample_tokens(model, params, jax.random.key(7), **kw)
    b = sampling.sample_tokens(model, params, jax.random.key(7), **kw)
    c = sampling.sample_tokens(model, params, jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0 <= int(a.min()) and int(a.max()) < VOCAB


def test_classifier_free_guidance(setup):
    model, params, _, labels = setup
    if not model.conditional:
        pytest.skip("guidance needs a conditional model")
    key = jax.random.key(11)
    plain = sampling.sample_tokens(model, params, key, batch_size=4, labels=labels)
    same = sampling.sample_tokens(model, params, key, batch_size=4, labels=labels, cfg_scale=1.0)
    np.testing.assert_array_equal(same, plain)
    # Scale 0 keeps only the null-class stream: the same as sampling the null class.
    null = jnp.full((4,), CLASSES, jnp.int32)
    uncond = sampling.sample_tokens(model, params, key, batch_size=4, labels=null)
    zero = sampling.sample_tokens(model, params, key, batch_size=4, labels=labels, cfg_scale=0.0)
    np.testing.assert_array_equal(zero, uncond)


def test_guide():
    cond, uncond = jnp.array([[1.0, 2.0, -3.0]]), jnp.array([[0.5, 0.0, 1.0]])
    np.testing.assert_array_equal(sampling.guide(cond, uncond, 1.0), cond)
    np.testing.assert_array_equal(sampling.guide(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(sampling.guide(cond, uncond, 3.0), [[2.0, 6.0, -11.0]])


def _kept(logits):
    return [np.flatnonzero(np.isfinite(row)).tolist() for row in np.asarray(logits)]


@pytest.mark.parametrize(
    "probs, p, kept",
    [
        ([0.1, 0.6, 0.3], 0.5, [1]),  # the top entry alone reaches p
        ([0.1, 0.6, 0.3], 0.61, [1, 2]),
        ([0.1, 0.6, 0.3], 0.95, [0, 1, 2]),
        ([0.1, 0.6, 0.3], 1.0, [0, 1, 2]),  # p = 1: everything
        ([0.1, 0.6, 0.3], 1e-9, [1]),  # always at least one
        ([0.2, 0.4, 0.2, 0.2], 0.5, [0, 1]),  # ties: the lower index first
        ([0.2, 0.4, 0.2, 0.2], 0.7, [0, 1, 2]),
        ([0.25, 0.25, 0.25, 0.25], 0.3, [0, 1]),
    ],
)
def test_apply_top_p(probs, p, kept):
    logits = jnp.log(jnp.array([probs], jnp.float32))
    out = sampling.apply_top_p(logits, p)
    assert _kept(out) == [kept]
    np.testing.assert_array_equal(out[0, np.array(kept)], logits[0, np.array(kept)])
    # Batched rows are independent; the last axis is the vocabulary.
    batched = sampling.apply_top_p(jnp.stack([logits[0], logits[0][::-1]]), p)
    assert _kept(batched)[0] == kept


def test_apply_top_k():
    logits = jnp.array([[0.0, 3.0, 1.0, 3.0, -2.0]])
    assert _kept(sampling.apply_top_k(logits, 1)) == [[1]]  # a tie: the lower index
    assert _kept(sampling.apply_top_k(logits, 3)) == [[1, 2, 3]]
    for k in (0, 5):
        np.testing.assert_array_equal(sampling.apply_top_k(logits, k), logits)


@pytest.mark.parametrize(
    "conditional, kwargs, match",
    [
        (True, dict(temperature=-0.5), "temperature"),
        (True, dict(temperature=float("inf")), "temperature"),
        (True, dict(top_k=-1), "top_k"),
        (True, dict(top_k=VOCAB + 1), "top_k"),
        (True, dict(top_p=0.0), "top_p"),
        (True, dict(top_p=1.5), "top_p"),
        (True, dict(cfg_scale=-1.0), "cfg_scale"),
        (True, dict(labels=None), "labels"),
        (True, dict(labels=[0, 1, 2, CLASSES + 1]), r"labels must be in \[0, 5\]"),
        (True, dict(labels=[0, 1, 2, -1]), "labels"),
        (True, dict(labels=[0, 1]), "labels"),
        (True, dict(prefix=np.zeros((4, T + 1), np.int32)), "prefix"),
        (True, dict(prefix=np.zeros((3, 2), np.int32)), "prefix"),
        (True, dict(prefix=np.full((4, 2), VOCAB, np.int32)), "prefix"),
        (True, dict(batch_size=0), "batch_size"),
        (True, dict(batch_size=6, mesh="mesh"), "batch_size"),
        (False, dict(labels=[0, 1, 2, 3]), "unconditional"),
        (False, dict(cfg_scale=2.0), "cfg_scale"),
    ],
)
def test_sampling_rejects_out_of_range_arguments(conditional, kwargs, match):
    model = VIM(vocab_size=VOCAB, grid_size=GRID, transformer=TINY,
                num_classes=CLASSES if conditional else 0)  # fmt: skip
    args = dict(batch_size=4, labels=jnp.arange(4, dtype=jnp.int32) if conditional else None)
    args.update(kwargs)
    if isinstance(args.get("labels"), list):
        args["labels"] = jnp.array(args["labels"], jnp.int32)
    if args.get("mesh") == "mesh":
        args["mesh"] = jax.make_mesh((8,), ("batch",))
        args["labels"] = jnp.zeros((args["batch_size"],), jnp.int32)
    with pytest.raises(InputError, match=match):
        sampling.sample_tokens(model, {}, jax.random.key(0), **args)


def test_model_rejects_bad_inputs():
    model = VIM(vocab_size=VOCAB, grid_size=GRID, transformer=TINY, num_classes=CLASSES)
    tokens = jnp.zeros((2, T), jnp.int32)
    labels = jnp.zeros((2,), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens, labels)
    for bad_tokens, bad_labels, match in [
        (jnp.zeros((2, T - 1), jnp.int32), labels, "tokens must be"),
        (jnp.full((2, T), VOCAB, jnp.int32), labels, r"tokens must be in \[0, 15\]"),
        (jnp.zeros((2, T)), labels, "integers"),
        (tokens, None, "labels"),
        (tokens, jnp.full((2,), CLASSES + 1, jnp.int32), r"labels must be in \[0, 5\]"),
    ]:
        with pytest.raises(InputError, match=match):
            model.apply(params, bad_tokens, bad_labels)
    uncond = VIM(vocab_size=VOCAB, grid_size=GRID, transformer=TINY)
    with pytest.raises(InputError, match="unconditional"):
        jax.eval_shape(uncond.init, jax.random.key(0), tokens, labels)


def test_sampling_on_a_mesh_matches_one_device():
    from vitvq import parallel

    model = VIM(vocab_size=VOCAB, grid_size=GRID, transformer=TINY, num_classes=CLASSES)
    tokens = jnp.zeros((8, T), jnp.int32)
    labels = jnp.arange(8, dtype=jnp.int32) % (CLASSES + 1)
    params = jax.jit(model.init)(jax.random.key(0), tokens, labels)["params"]
    kw = dict(batch_size=8, labels=labels, top_k=10, top_p=0.95, cfg_scale=2.0)
    kw.update(prefix=jnp.ones((8, 3), jnp.int32))
    one = sampling.sample_tokens(model, params, jax.random.key(2), **kw)
    for mesh in (
        jax.make_mesh((8,), ("batch",)),  # Explicit axes, the jax.make_mesh default
        parallel.make_mesh({"data": 4, "fsdp": 2, "tensor": 1}),  # the project's mesh
    ):
        many = sampling.sample_tokens(model, params, jax.random.key(2), mesh=mesh, **kw)
        assert len(many.sharding.device_set) == 8
        assert many.addressable_shards[0].data.shape == (1, T)
        np.testing.assert_array_equal(np.asarray(many), np.asarray(one))


@pytest.mark.parametrize("preset", ["base", "large"])
def test_paper_parameter_counts(preset):
    model = build_vim({"preset": preset}, vocab_size=8192, grid_size=32, num_classes=1000)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1024), jnp.int32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )  # fmt: skip
    count = _count(shapes["params"]) / 1e6
    print(f"VIM-{preset}: {count:.1f}M parameters (paper {PAPER_PARAMS[preset]}M)")
    # Ours: depth x (4 w^2 + 2 w mlp) plus the token embedding and the logits layer (vocab x w
    # each) and the class and position embeddings: 706.8M / 1848.6M, 8.7% / 8.9% over the
    # paper's rounded figures, which likely leave out the embeddings and the output layer.
    assert abs(count - PAPER_PARAMS[preset]) / PAPER_PARAMS[preset] < 0.1


def test_parameters_carry_logical_axis_names():
    for classes in (0, CLASSES):
        model = VIM(vocab_size=VOCAB, grid_size=GRID, transformer=TINY, num_classes=classes)
        labels = jnp.zeros((1,), jnp.int32) if classes else None
        variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32),
                                   labels)  # fmt: skip
        leaves = jax.tree_util.tree_leaves(
            variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
        assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
        specs = nn.get_partition_spec(variables["params"])
        assert tuple(specs["token_embedding"]) == ("vocab", "embed")
        assert tuple(specs["logits"]["kernel"]) == ("embed", "vocab")
        assert tuple(specs["blocks_0"]["attn"]["query_kernel"]) == ("embed", "heads", "kv")
        if classes:
            assert tuple(specs["class_embedding"]) == ("classes", "embed")
            assert variables["params"]["class_embedding"].value.shape == (CLASSES + 1, 32)


def test_features_and_config():
    model = build_vim(
        {"preset": "tiny", "width": 16, "mlp_dim": 16, "depth": 3}, VOCAB, GRID, num_classes=0
    )
    assert model.transformer == TransformerSpec(16, 3, 2, 16, 0.0)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    features = jax.jit(
        lambda tokens, block: model.apply(params, tokens, None, block, method=model.features),
        static_argnums=1,
    )
    feats = features(tokens, 2)
    assert feats.shape == (2, T, 16)
    with pytest.raises(InputError, match=r"block must be in \[1, 3\]"):
        model.apply(params, tokens, None, 4, method=model.features)
    for cfg, match in [
        ({"preset": "huge"}, "unknown VIM preset"),
        ({"width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 8, "heads": 2}, "unknown keys"),
        ({"width": 64, "depth": 2}, "missing"),
        ({"preset": "tiny", "num_heads": 3}, "not divisible"),
        ({"preset": "tiny", "dropout": 1.0}, "dropout"),
        ({"preset": "tiny", "depth": 0}, "depth"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_vim(cfg, vocab_size=VOCAB, grid_size=GRID)
    assert VIM_PRESETS["base"].dropout == 0.1
    dropped = drop_labels(jax.random.key(0), jnp.zeros((1000,), jnp.int32), 0.25, CLASSES)
    assert set(np.unique(dropped).tolist()) == {0, CLASSES}
    assert 0.2 < float(jnp.mean(dropped == CLASSES)) < 0.3


def test_remat_recomputes_blocks_with_the_same_parameters_results_and_gradients():
    cfg = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "dropout": 0.1}
    plain = build_vim(cfg, VOCAB, GRID, num_classes=CLASSES)
    remat = build_vim({**cfg, "remat": True}, VOCAB, GRID, num_classes=CLASSES)
    assert (plain.remat, remat.remat) == (False, True)
    tokens = jax.random.randint(jax.random.key(1), (4, T), 0, VOCAB, jnp.int32)
    labels = jnp.array([0, 1, 4, CLASSES], jnp.int32)
    params = nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), tokens, labels)["params"])
    remat_params = nn.meta.unbox(jax.jit(remat.init)(jax.random.key(0), tokens, labels)["params"])
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(remat_params)

    def loss(model, p):
        logits = model.apply(
            {"params": p}, tokens, labels, train=True, rngs={"dropout": jax.random.key(2)}
        )
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    assert_remat_changes_only_the_program(
        lambda p: loss(plain, p), lambda p: loss(remat, p), params
    )
    # Decoding through the remat blocks (static `block` argument) gives the forward's logits.
    full = jax.jit(lambda p: remat.apply({"params": p}, tokens, labels))(params)
    inputs = jnp.concatenate([labels[:, None], tokens[:, :-1]], axis=1)
    head, _ = jax.jit(lambda p, c, x: remat.apply({"params": p}, c, x, method=remat.decode_step))(
        params, remat.init_cache(4), inputs[:, :5]
    )
    np.testing.assert_allclose(head, full[:, :5], rtol=1e-5, atol=1e-5)
