"""VIM: a decoder-only transformer over the codes of an image in raster order (Yu et al. 2022).

Sequence layout. A grid of `grid_size x grid_size` codes is the sequence x_0 .. x_{T-1},
T = grid_size**2, in raster order (row by row). The transformer sees T slots; slot t's
output predicts x_t, so slot t's input is what comes before x_t:

    slot     0          1     2     ...  T-1
    input    cls/start  x_0   x_1   ...  x_{T-2}
    target   x_0        x_1   x_2   ...  x_{T-1}

Slot 0 holds the class embedding of the label when the model is class-conditional
(`num_classes > 0`; label `num_classes` is the extra "null" class used for classifier-free
guidance and class dropout), or a learned start embedding when it is unconditional. Both
cases have exactly T slots. Slot t also gets the position embedding of grid cell t, the cell
its output predicts: a learned row embedding plus a learned column embedding (additive 2D,
`row_embedding[t // grid] + column_embedding[t % grid]`).

Blocks are pre-LayerNorm with causal self-attention (`jax.nn.dot_product_attention`) and
dropout on the attention output, the MLP activation and the MLP output (docs/paper.md: residual,
activation and attention outputs); a final LayerNorm; logits over the codebook.

Decoding uses an explicit, fixed-length KV cache (`init_cache`, `decode_step`): a dict with
one {"key", "value"} pair of head-major [batch, heads, T, head_dim] buffers per block and the
number of slots already filled ("index"); `split_cache` turns each buffer into a tuple of
blocks, so that a step reads only the blocks filled so far. The same parameters serve the
full forward pass and decoding (one block module, two paths), so a trained tree decodes as is.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitvq.errors import ConfigError, InputError
from vitvq.models import axes
from vitvq.models.layers import (
    MlpBlock,
    constrain,
    default_kernel_init,
    dense,
    layer_norm,
    partitioned,
)
from vitvq.models.vit import TransformerSpec

Dtype = Any
Cache = dict[str, Any]  # {"index": int32 [], "layers": ({"key", "value"}, ...)}

# docs/paper.md table 2 (base, large); small and tiny are for experiments and tests.
# The largest vocabulary (the tokenizer's code count) a VIM takes: 2**18, LFQ's largest
# (MAGVIT-v2's vocabulary, the largest SimVQ reports). Past it the output logits and the
# vocabulary's embedding and output parameters outgrow the transformer itself at the paper's
# sizes: docs/codebook.md, "The VIM's largest vocabulary".
MAX_VOCAB = 2**18

VIM_PRESETS = {
    "base": TransformerSpec(width=1536, depth=24, num_heads=16, mlp_dim=6144, dropout=0.1),
    "large": TransformerSpec(width=2048, depth=36, num_heads=32, mlp_dim=8192, dropout=0.1),
    "small": TransformerSpec(width=512, depth=8, num_heads=8, mlp_dim=2048, dropout=0.1),
    "tiny": TransformerSpec(width=64, depth=2, num_heads=2, mlp_dim=128, dropout=0.0),
}


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with an optional KV cache.

    Parameter names and shapes are those of `layers.Attention`. Without `cache` it attends
    over the whole input causally. With `cache` ({"key", "value"}: [B, heads, T, head_dim])
    the input holds the L slots starting at `index`: their keys and values are written into
    the cache and each attends to every cached slot up to itself (see `_cached_attention`).
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, L, width]
        deterministic: bool = True,
        cache: Mapping[str, Any] | None = None,
        index: jax.Array | None = None,
        block: int | None = None,
    ):
        width = x.shape[-1]
        head_dim = width // self.num_heads

        def param(name, shape, names, init=default_kernel_init):
            return self.param(name, partitioned(init, names), shape, self.param_dtype)

        x = x.astype(self.dtype)
        q, k, v = (
            jnp.einsum(
                "bld,dhk->blhk",
                x,
                param(
                    f"{n}_kernel",
                    (width, self.num_heads, head_dim),
                    (axes.EMBED, axes.HEADS, axes.KV),
                ).astype(self.dtype),
            )
            + param(
                f"{n}_bias",
                (self.num_heads, head_dim),
                (axes.HEADS, axes.KV),
                nn.initializers.zeros,
            ).astype(self.dtype)
            for n in ("query", "key", "value")
        )  # [B, L, heads, head_dim]
        if cache is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            new_cache = None
        else:
            out, new_cache = _cached_attention(q, k, v, cache, index, block, self.dtype)
        kernel = param(
            "out_kernel", (self.num_heads, head_dim, width), (axes.HEADS, axes.KV, axes.EMBED)
        )
        out = jnp.einsum("blhk,hkd->bld", out, kernel.astype(self.dtype))
        out = out + param("out_bias", (width,), (axes.EMBED,), nn.initializers.zeros).astype(
            self.dtype
        )
        out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
        return out if cache is None else (out, new_cache)


def _cached_attention(q, k, v, cache, index, block: int | None, dtype):
    """Attention of L new slots (from slot `index` on) over the KV cache, which holds
    [B, heads, slots, head_dim] buffers: one of all T slots, or (`VIM.split_cache`) a tuple of
    blocks of S slots each, the new slots all in block `block`. The new keys and values are
    written into that one buffer (in place in a decoding loop) and only blocks 0..block are
    read; scores are concatenated across blocks (they are small), never keys or values.
    Head-major buffers make both products plain batched matmuls: no transposed copy of the
    cache at every step."""
    blocked = isinstance(cache["key"], tuple)
    if blocked and block is None:
        raise ValueError("a blocked KV cache needs the static `block` the new slots are in")
    keys = list(cache["key"]) if blocked else [cache["key"]]
    values = list(cache["value"]) if blocked else [cache["value"]]
    block = block if blocked else 0
    size = keys[0].shape[2]
    offset = index - block * size

    def write(buffers, new):  # new: [B, L, heads, head_dim]
        buffers[block] = jax.lax.dynamic_update_slice_in_dim(
            buffers[block], new.transpose(0, 2, 1, 3).astype(buffers[block].dtype), offset, axis=2
        )

    write(keys, k)
    write(values, v)
    q = (q * jnp.asarray(q.shape[-1] ** -0.5, dtype)).transpose(0, 2, 1, 3)  # [B, h, L, d]
    query_pos = index + jnp.arange(q.shape[2])[:, None]  # [L, 1]
    scores = []
    for j in range(block + 1):
        s = jnp.einsum("bhlk,bhsk->bhls", q, keys[j].astype(dtype))
        if j == block:  # earlier blocks are full; this one up to each query's own slot
            mask = block * size + jnp.arange(size)[None, :] <= query_pos
            s = jnp.where(mask[None, None], s, jnp.finfo(s.dtype).min)
        scores.append(s)
    weights = jax.nn.softmax(jnp.concatenate(scores, axis=-1).astype(jnp.float32), axis=-1)
    weights = weights.astype(dtype)
    out = sum(
        jnp.einsum(
            "bhls,bhsk->bhlk", weights[..., j * size : (j + 1) * size], values[j].astype(dtype)
        )
        for j in range(block + 1)
    )
    new_cache = (
        {"key": tuple(keys), "value": tuple(values)}
        if blocked
        else {"key": keys[0], "value": values[0]}
    )
    return out.transpose(0, 2, 1, 3), new_cache  # [B, L, heads, head_dim]


class VIMBlock(nn.Module):
    """Pre-LayerNorm causal block, x + attn(ln(x)); x + mlp(ln(x)), with an optional cache.

    Same parameter names as `layers.TransformerBlock`. Returns x, or (x, cache) with a cache.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True, cache=None, index=None, block=None):
        x = constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm("ln_attn", self.param_dtype)(x).astype(self.dtype)
        attn = CausalSelfAttention(self.num_heads, self.dropout, name="attn", **kw)
        if cache is None:
            x = x + attn(h, deterministic)
        else:
            out, cache = attn(h, deterministic, cache, index, block)
            x = x + out
        h = layer_norm("ln_mlp", self.param_dtype)(x).astype(self.dtype)
        x = x + MlpBlock(self.mlp_dim, self.dropout, name="mlp", **kw)(h, deterministic)
        x = constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        return x if cache is None else (x, cache)


class VIM(nn.Module):
    """Codes [B, T] (+ labels [B]) -> next-code logits [B, T, vocab_size] float32.

    See the module docstring for the sequence layout and the cache.
    """

    vocab_size: int = 8192  # codebook size of the tokenizer
    grid_size: int = 32  # codes per side; the sequence has grid_size**2 slots
    transformer: TransformerSpec = VIM_PRESETS["base"]
    num_classes: int = 0  # 0: unconditional; else labels in [0, num_classes], num_classes = null
    # Recompute each block's activations in the backward pass instead of keeping them: about
    # a third more FLOPs, and the paper's VIMs at batch 1024 fit a 32 GiB chip (BENCHMARKS.md,
    # ahead-of-time compilation). Parameters and results are the same either way.
    remat: bool = False
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32

    @property
    def seq_len(self) -> int:
        return self.grid_size**2

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def null_class(self) -> int:
        """The label of the "null" class (classifier-free guidance, class dropout)."""
        return self.num_classes

    def setup(self):
        validate_vim(self)
        s = self.transformer
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = nn.initializers.normal(0.02)
        self.token_embedding = self.param(
            "token_embedding",
            partitioned(emb, (axes.VOCAB, axes.EMBED)),
            (self.vocab_size, s.width),
            self.param_dtype,
        )
        if self.conditional:
            self.class_embedding = self.param(
                "class_embedding",
                partitioned(emb, (axes.CLASSES, axes.EMBED)),
                (self.num_classes + 1, s.width),
                self.param_dtype,
            )
        else:
            self.start_embedding = self.param(
                "start_embedding", partitioned(emb, (axes.EMBED,)), (s.width,), self.param_dtype
            )
        pos_names = (axes.LENGTH, axes.EMBED)
        self.row_embedding = self.param(
            "row_embedding",
            partitioned(emb, pos_names),
            (self.grid_size, s.width),
            self.param_dtype,
        )
        self.column_embedding = self.param(
            "column_embedding",
            partitioned(emb, pos_names),
            (self.grid_size, s.width),
            self.param_dtype,
        )
        # static: `deterministic` and `block` (arguments 2 and 5, counting the module as 0).
        block_class = nn.remat(VIMBlock, static_argnums=(2, 5)) if self.remat else VIMBlock
        self.blocks = [block_class(s.num_heads, s.mlp_dim, s.dropout, **kw) for _ in range(s.depth)]
        self.ln_final = layer_norm(None, self.param_dtype)
        self.logits = dense(self.vocab_size, axes.EMBED, axes.VOCAB, **kw)

    # Shared pieces.

    def _embed(self, inputs: jax.Array, start) -> jax.Array:
        """Slot inputs [B, L] (slot 0: label; later slots: the previous code) for the slots
        start .. start+L-1 -> embeddings [B, L, width] with position embeddings."""
        length = inputs.shape[1]
        tokens = jnp.take(self.token_embedding, jnp.clip(inputs, 0, self.vocab_size - 1), axis=0)
        # Only the chunk's first slot can be slot 0; its embedding is [B, width].
        if self.conditional:
            label = jnp.clip(inputs[:, 0], 0, self.num_classes)
            first = jnp.take(self.class_embedding, label, axis=0)
        else:
            first = jnp.broadcast_to(self.start_embedding, (inputs.shape[0], tokens.shape[-1]))
        slot = start + jnp.arange(length)  # [L]
        x = jnp.where((slot == 0)[None, :, None], first[:, None, :], tokens)
        pos = (self.row_embedding[:, None, :] + self.column_embedding[None, :, :]).reshape(
            self.seq_len, -1
        )  # [T, width], raster order
        pos = jax.lax.dynamic_slice_in_dim(pos, start, length, axis=0)
        x = (x + pos[None]).astype(self.dtype)
        return constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED))

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.ln_final(x).astype(self.dtype)
        logits = self.logits(x).astype(jnp.float32)
        return constrain(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))

    def _teacher_forcing_inputs(self, tokens, labels) -> jax.Array:
        check_tokens(tokens, self.seq_len, self.vocab_size)
        b = tokens.shape[0]
        check_labels(labels, b, self.num_classes)
        first = labels if self.conditional else jnp.zeros((b,), jnp.int32)
        return jnp.concatenate(
            [first.astype(jnp.int32)[:, None], tokens[:, :-1].astype(jnp.int32)], axis=1
        )

    # Public methods.

    def __call__(
        self, tokens: jax.Array, labels: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """Teacher-forced logits: tokens int [B, T], labels int [B] (None when unconditional)
        -> float32 [B, T, vocab_size], where [:, t] predicts tokens[:, t]."""
        x = self._embed(self._teacher_forcing_inputs(tokens, labels), 0)
        for block in self.blocks:
            # All arguments positional: a remat block needs its static ones (2 and 5) present.
            x = block(x, not train, None, None, None)
        return self._logits(x)

    def features(
        self, tokens: jax.Array, labels: jax.Array | None = None, block: int = 1
    ) -> jax.Array:
        """The output of block `block` (1-based, as the paper counts: "block 15 of 36"),
        [B, T, width], for the linear probe. Later blocks are not computed; no dropout."""
        if not 1 <= block <= self.transformer.depth:
            raise InputError(f"block must be in [1, {self.transformer.depth}], got {block}")
        x = self._embed(self._teacher_forcing_inputs(tokens, labels), 0)
        for layer in self.blocks[:block]:
            x = layer(x, True, None, None, None)
        return x

    def init_cache(self, batch_size: int) -> Cache:
        """An empty KV cache for `batch_size` sequences (no parameters needed; callable on
        an unbound module)."""
        s = self.transformer
        shape = (batch_size, s.num_heads, self.seq_len, s.width // s.num_heads)
        layers = tuple(
            {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}
            for _ in range(s.depth)
        )
        return {"index": jnp.zeros((), jnp.int32), "layers": layers}

    @staticmethod
    def split_cache(cache: Cache, block_size: int) -> Cache:
        """The same cache as a tuple of blocks of `block_size` slots per layer (T must be a
        multiple): decoding then reads only the blocks up to the current one."""

        def split(x):  # [B, heads, T, head_dim]
            total = x.shape[2]
            if total % block_size:
                raise InputError(f"cache length {total} is not a multiple of {block_size}")
            return tuple(x[:, :, i : i + block_size] for i in range(0, total, block_size))

        layers = tuple(
            {"key": split(layer["key"]), "value": split(layer["value"])}
            for layer in cache["layers"]
        )
        return {"index": cache["index"], "layers": layers}

    def decode_step(
        self, cache: Cache, inputs: jax.Array, block: int | None = None
    ) -> tuple[jax.Array, Cache]:
        """Runs the next slot(s) through the cache; no dropout.

        inputs: int [B] (one slot) or [B, L] (L slots, e.g. a prefill) starting at slot
        `cache["index"]`. The input of slot 0 is the label (ignored when unconditional); of
        slot t > 0 the code x_{t-1}. Returns (logits float32 [B, vocab] or [B, L, vocab],
        predicting x_index .. x_{index+L-1}; the cache with index advanced by L). Slots past
        T - 1 are the caller's error (not checked under jit). With a blocked cache
        (`split_cache`), `block` (a Python int) is the block all the input slots fall in;
        only blocks 0..block are read.
        """
        single = inputs.ndim == 1
        inputs = (inputs[:, None] if single else inputs).astype(jnp.int32)
        index = cache["index"]
        x = self._embed(inputs, index)
        layers = []
        for layer, layer_cache in zip(self.blocks, cache["layers"], strict=True):
            x, layer_cache = layer(x, True, layer_cache, index, block)
            layers.append(layer_cache)
        logits = self._logits(x)
        new_cache = {"index": index + inputs.shape[1], "layers": tuple(layers)}
        return (logits[:, 0] if single else logits), new_cache


def check_vocab_size(num_codes: int, source: str) -> None:
    """One-line ConfigError when `source` (what gives the codes) has more than MAX_VOCAB."""
    if num_codes > MAX_VOCAB:
        raise ConfigError(
            f"{source} has {num_codes} codes, more than the largest VIM vocabulary, "
            f"{MAX_VOCAB} (2**18; docs/codebook.md): a VIM needs a tokenizer of at most "
            f"{MAX_VOCAB} codes"
        )


def validate_vim(model: VIM) -> None:
    """Raises ConfigError on inconsistent hyperparameters, naming the value."""
    s = model.transformer
    for name, value in (
        ("vocab_size", model.vocab_size),
        ("grid_size", model.grid_size),
        ("width", s.width),
        ("depth", s.depth),
        ("num_heads", s.num_heads),
        ("mlp_dim", s.mlp_dim),
    ):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"VIM {name} must be a positive integer, got {value!r}")
    check_vocab_size(model.vocab_size, f"the VIM's vocab_size={model.vocab_size} (its tokenizer)")
    if s.width % s.num_heads:
        raise ConfigError(f"VIM width {s.width} is not divisible by its {s.num_heads} heads")
    if not 0.0 <= s.dropout < 1.0:
        raise ConfigError(f"VIM dropout must be in [0, 1), got {s.dropout}")
    if not isinstance(model.num_classes, int | np.integer) or model.num_classes < 0:
        raise ConfigError(
            f"VIM num_classes must be an integer >= 0 (0: unconditional), got {model.num_classes!r}"
        )


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_tokens(tokens: jax.Array, seq_len: int, vocab_size: int, what: str = "tokens") -> None:
    """Raises InputError unless `tokens` is int [B, seq_len] in [0, vocab_size) (values are
    checked only when concrete)."""
    shape = tuple(tokens.shape)
    if len(shape) != 2 or shape[1] != seq_len:
        raise InputError(f"{what} must be [batch, {seq_len}] (raster order), got shape {shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InputError(f"{what} must be integers, got dtype {tokens.dtype}")
    _check_range(tokens, 0, vocab_size - 1, what)


def check_labels(labels, batch_size: int, num_classes: int, *, allow_null: bool = True) -> None:
    """Raises InputError unless labels fit the model: None when unconditional, else int
    [batch_size] in [0, num_classes] (num_classes is the null class, when allowed)."""
    if num_classes == 0:
        if labels is not None:
            raise InputError("labels were given but the model is unconditional (num_classes=0)")
        return
    if labels is None:
        raise InputError(
            f"the model is class-conditional ({num_classes} classes): labels [batch] are required"
        )
    shape = tuple(labels.shape)
    if shape != (batch_size,):
        raise InputError(f"labels must be [batch] = [{batch_size}], got shape {shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    _check_range(labels, 0, num_classes if allow_null else num_classes - 1, "labels")


def _check_range(x, low: int, high: int, what: str) -> None:
    if _concrete(x) and x.size:
        values = np.asarray(x)
        lo, hi = int(values.min()), int(values.max())
        if lo < low or hi > high:
            raise InputError(f"{what} must be in [{low}, {high}], got values in [{lo}, {hi}]")


def drop_labels(rng: jax.Array, labels: jax.Array, rate: float, num_classes: int) -> jax.Array:
    """Replaces each label by the null class (id num_classes) with probability `rate`."""
    drop = jax.random.bernoulli(rng, rate, labels.shape)
    return jnp.where(drop, num_classes, labels).astype(labels.dtype)


VIM_CONFIG_KEYS = ("preset", "width", "depth", "num_heads", "mlp_dim", "dropout", "remat")


def vim_spec(cfg: Mapping[str, Any]) -> TransformerSpec:
    """A TransformerSpec from a `model` config block: an optional `preset` (VIM_PRESETS)
    whose sizes the other keys override, else all of width, depth, num_heads, mlp_dim."""
    fields = dict(cfg)
    unknown = set(fields) - set(VIM_CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            f"VIM model config has unknown keys {sorted(unknown)}; expected {list(VIM_CONFIG_KEYS)}"
        )
    fields.pop("remat", None)  # not a size: read by build_vim
    preset = fields.pop("preset", None)
    if preset is not None:
        if preset not in VIM_PRESETS:
            raise ConfigError(
                f"unknown VIM preset {preset!r}; expected one of {sorted(VIM_PRESETS)}"
            )
        fields = {**dataclasses.asdict(VIM_PRESETS[preset]), **fields}
    missing = {"width", "depth", "num_heads", "mlp_dim"} - set(fields)
    if missing:
        raise ConfigError(f"VIM model config is missing {sorted(missing)} (or give a preset)")
    return TransformerSpec(**fields)


def build_vim(
    cfg: Mapping[str, Any],
    vocab_size: int,
    grid_size: int,
    num_classes: int = 0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> VIM:
    """A VIM from a `model` config block (or the same dict read from a bundle)."""
    model = VIM(
        vocab_size=vocab_size,
        grid_size=grid_size,
        transformer=vim_spec(cfg),
        num_classes=num_classes,
        remat=bool(cfg.get("remat", False)),
        dtype=dtype,
        param_dtype=param_dtype,
    )
    validate_vim(model)
    return model
