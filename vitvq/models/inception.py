"""InceptionV3 as used for FID (pytorch-fid's port of the 2015-12-05 TensorFlow graph).

This is torchvision's `Inception3` with pytorch-fid's FID patches: the average pools inside
the A, C and E blocks ignore padded pixels (`count_include_pad=False`), the pool branch of the
last E block (Mixed_7c) is a 3x3 max pool, the classifier has 1008 outputs and batch norm uses
eps 1e-3. Inference only: batch norm is applied with its stored statistics, which are plain
parameters here (`<layer>/bn/{scale,bias,mean,var}`), so a params dict is all the module needs.

Parameter names mirror the PyTorch state_dict, so converting the pytorch-fid weights file is a
rename plus a transpose (see `params_from_torch_state_dict`):

    Conv2d_1a_3x3.conv.weight [O,I,kh,kw]  ->  Conv2d_1a_3x3/conv/kernel [kh,kw,I,O]
    Mixed_5b.branch1x1.bn.running_var      ->  Mixed_5b/branch1x1/bn/var
    fc.weight [1008,2048]                  ->  fc/kernel [2048,1008]

Layout is NHWC. `InceptionV3()(images)` takes uint8 images or floats in [0, 1] of any size,
resizes them bilinearly to 299x299 (like `F.interpolate(..., align_corners=False)`), scales
them to [-1, 1] and returns `{"pool": [B, 2048], "logits": [B, 1008]}` (pool3 features after
the global average pool, and the classifier logits).
"""

from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitvq import errors
from vitvq.models import tree

FID_IMAGE_SIZE = 299
FID_NUM_CLASSES = 1008
POOL_FEATURES = 2048
BN_EPS = 1e-3

Params = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Modules.


class InferenceBatchNorm(nn.Module):
    """Batch norm with fixed statistics as params: scale * (x - mean) / sqrt(var + eps) + bias."""

    features: int
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features,)
        scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, shape, jnp.float32)
        var = self.param("var", nn.initializers.ones, shape, jnp.float32)
        multiplier = scale * jax.lax.rsqrt(var + self.eps)
        return x * multiplier + (bias - mean * multiplier)


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: convolution without bias, batch norm, ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        return nn.relu(InferenceBatchNorm(self.features, name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, averaging only over real (unpadded) pixels."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, name, pad=(0, 0): BasicConv(
            f, k, padding=pad, precision=self.precision, name=name
        )
        b1 = conv(64, (1, 1), "branch1x1")(x)
        b5 = conv(48, (1, 1), "branch5x5_1")(x)
        b5 = conv(64, (5, 5), "branch5x5_2", (2, 2))(b5)
        b3 = conv(64, (1, 1), "branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), "branch3x3dbl_2", (1, 1))(b3)
        b3 = conv(96, (3, 3), "branch3x3dbl_3", (1, 1))(b3)
        bp = conv(self.pool_features, (1, 1), "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        b3 = BasicConv(384, (3, 3), stride=2, precision=p, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), precision=p, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), precision=p, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, precision=p, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorized 7x7 branches."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        conv = lambda f, k, name, pad=(0, 0): BasicConv(
            f, k, padding=pad, precision=self.precision, name=name
        )
        b1 = conv(192, (1, 1), "branch1x1")(x)
        b7 = conv(c7, (1, 1), "branch7x7_1")(x)
        b7 = conv(c7, (1, 7), "branch7x7_2", (0, 3))(b7)
        b7 = conv(192, (7, 1), "branch7x7_3", (3, 0))(b7)
        bd = conv(c7, (1, 1), "branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), "branch7x7dbl_2", (3, 0))(bd)
        bd = conv(c7, (1, 7), "branch7x7dbl_3", (0, 3))(bd)
        bd = conv(c7, (7, 1), "branch7x7dbl_4", (3, 0))(bd)
        bd = conv(192, (1, 7), "branch7x7dbl_5", (0, 3))(bd)
        bp = conv(192, (1, 1), "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        b3 = BasicConv(192, (1, 1), precision=p, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, precision=p, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), precision=p, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), precision=p, name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), precision=p, name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, precision=p, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: expanded filter bank; `max_pool` selects FIDInceptionE_2's pool branch."""

    max_pool: bool = False
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, name, pad=(0, 0): BasicConv(
            f, k, padding=pad, precision=self.precision, name=name
        )
        b1 = conv(320, (1, 1), "branch1x1")(x)
        b3 = conv(384, (1, 1), "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), "branch3x3_2a", (0, 1))(b3),
                conv(384, (3, 1), "branch3x3_2b", (1, 0))(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), "branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), "branch3x3dbl_2", (1, 1))(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), "branch3x3dbl_3a", (0, 1))(bd),
                conv(384, (3, 1), "branch3x3dbl_3b", (1, 0))(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = conv(192, (1, 1), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess_images(images: jax.Array, resize: bool = True, normalize: bool = True) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] NHWC images -> float32, 299x299, in [-1, 1].

    The resize is bilinear with half-pixel centers and no antialiasing, as pytorch-fid's
    `F.interpolate(mode="bilinear", align_corners=False)`.
    """
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    if resize and x.shape[1:3] != (FID_IMAGE_SIZE, FID_IMAGE_SIZE):
        shape = (x.shape[0], FID_IMAGE_SIZE, FID_IMAGE_SIZE, x.shape[3])
        x = jax.image.resize(x, shape, method="bilinear", antialias=False)
    if normalize:
        x = 2.0 * x - 1.0
    return x


class InceptionV3(nn.Module):
    """The FID InceptionV3; returns {"pool": [B, 2048], "logits": [B, num_classes]} in float32.

    With `resize_input`/`normalize_input` (the defaults) it takes uint8 images or floats in
    [0, 1] of any size; with both off it takes [-1, 1] images of at least 75x75 as they are.
    """

    num_classes: int = FID_NUM_CLASSES
    resize_input: bool = True
    normalize_input: bool = True
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        p = self.precision
        x = preprocess_images(images, self.resize_input, self.normalize_input)
        x = BasicConv(32, (3, 3), stride=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, precision=p, name=name)(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, precision=p, name="fc")(pool)
        return {"pool": pool, "logits": logits}


# --------------------------------------------------------------------------------------------
# The PyTorch state_dict layout, written out independently of the modules above (a test checks
# that both agree), and the conversion between the two layouts.


def _basic(name: str, cin: int, cout: int, kh: int, kw: int) -> Iterator[tuple[str, tuple]]:
    yield f"{name}.conv.weight", (cout, cin, kh, kw)
    for stat in ("weight", "bias", "running_mean", "running_var"):
        yield f"{name}.bn.{stat}", (cout,)


def _block_convs(kind: str, cin: int, arg: int = 0) -> list[tuple[str, int, int, int, int]]:
    """(branch name, in, out, kh, kw) of each BasicConv2d of a torchvision Inception block."""
    if kind == "A":
        return [
            ("branch1x1", cin, 64, 1, 1),
            ("branch5x5_1", cin, 48, 1, 1),
            ("branch5x5_2", 48, 64, 5, 5),
            ("branch3x3dbl_1", cin, 64, 1, 1),
            ("branch3x3dbl_2", 64, 96, 3, 3),
            ("branch3x3dbl_3", 96, 96, 3, 3),
            ("branch_pool", cin, arg, 1, 1),
        ]
    if kind == "B":
        return [
            ("branch3x3", cin, 384, 3, 3),
            ("branch3x3dbl_1", cin, 64, 1, 1),
            ("branch3x3dbl_2", 64, 96, 3, 3),
            ("branch3x3dbl_3", 96, 96, 3, 3),
        ]
    if kind == "C":
        c7 = arg
        return [
            ("branch1x1", cin, 192, 1, 1),
            ("branch7x7_1", cin, c7, 1, 1),
            ("branch7x7_2", c7, c7, 1, 7),
            ("branch7x7_3", c7, 192, 7, 1),
            ("branch7x7dbl_1", cin, c7, 1, 1),
            ("branch7x7dbl_2", c7, c7, 7, 1),
            ("branch7x7dbl_3", c7, c7, 1, 7),
            ("branch7x7dbl_4", c7, c7, 7, 1),
            ("branch7x7dbl_5", c7, 192, 1, 7),
            ("branch_pool", cin, 192, 1, 1),
        ]
    if kind == "D":
        return [
            ("branch3x3_1", cin, 192, 1, 1),
            ("branch3x3_2", 192, 320, 3, 3),
            ("branch7x7x3_1", cin, 192, 1, 1),
            ("branch7x7x3_2", 192, 192, 1, 7),
            ("branch7x7x3_3", 192, 192, 7, 1),
            ("branch7x7x3_4", 192, 192, 3, 3),
        ]
    assert kind == "E", kind
    return [
        ("branch1x1", cin, 320, 1, 1),
        ("branch3x3_1", cin, 384, 1, 1),
        ("branch3x3_2a", 384, 384, 1, 3),
        ("branch3x3_2b", 384, 384, 3, 1),
        ("branch3x3dbl_1", cin, 448, 1, 1),
        ("branch3x3dbl_2", 448, 384, 3, 3),
        ("branch3x3dbl_3a", 384, 384, 1, 3),
        ("branch3x3dbl_3b", 384, 384, 3, 1),
        ("branch_pool", cin, 192, 1, 1),
    ]


_STEM = (
    ("Conv2d_1a_3x3", 3, 32, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 32, 64, 3, 3),
    ("Conv2d_3b_1x1", 64, 80, 1, 1),
    ("Conv2d_4a_3x3", 80, 192, 3, 3),
)
_MIXED = (
    ("Mixed_5b", "A", 192, 32),
    ("Mixed_5c", "A", 256, 64),
    ("Mixed_5d", "A", 288, 64),
    ("Mixed_6a", "B", 288, 0),
    ("Mixed_6b", "C", 768, 128),
    ("Mixed_6c", "C", 768, 160),
    ("Mixed_6d", "C", 768, 160),
    ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, 0),
    ("Mixed_7b", "E", 1280, 0),
    ("Mixed_7c", "E", 2048, 0),
)


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of pytorch-fid's FID Inception state_dict (without num_batches_tracked)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for conv in _STEM:
        shapes.update(_basic(*conv))
    for block, kind, cin, arg in _MIXED:
        for branch, *dims in _block_convs(kind, cin, arg):
            shapes.update(_basic(f"{block}.{branch}", *dims))
    shapes["fc.weight"] = (FID_NUM_CLASSES, POOL_FEATURES)
    shapes["fc.bias"] = (FID_NUM_CLASSES,)
    return shapes


_TORCH_TO_FLAX_LEAF = {
    "conv.weight": "conv/kernel",
    "bn.weight": "bn/scale",
    "bn.bias": "bn/bias",
    "bn.running_mean": "bn/mean",
    "bn.running_var": "bn/var",
}


def torch_to_flax_name(name: str) -> str:
    """`Mixed_5b.branch1x1.conv.weight` -> `Mixed_5b/branch1x1/conv/kernel`, etc."""
    if name == "fc.weight":
        return "fc/kernel"
    if name == "fc.bias":
        return "fc/bias"
    for torch_leaf, flax_leaf in _TORCH_TO_FLAX_LEAF.items():
        if name.endswith("." + torch_leaf):
            return name[: -len(torch_leaf)].replace(".", "/") + flax_leaf
    raise KeyError(f"no Flax name for PyTorch tensor {name!r}")


def _torch_to_flax_array(name: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if name.endswith("conv.weight"):
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    if name == "fc.weight":
        return np.ascontiguousarray(value.T)
    return value


def _flax_to_torch_array(name: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if name.endswith("conv.weight"):
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if name == "fc.weight":
        return np.ascontiguousarray(value.T)
    return value


def flax_param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat `a/b/c` names and shapes of `InceptionV3`'s params, derived from the torch layout."""
    out = {}
    for name, shape in torch_state_dict_shapes().items():
        dummy = np.empty(shape, np.float32)
        out[torch_to_flax_name(name)] = _torch_to_flax_array(name, dummy).shape
    return out


def _first(names, n: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_param_shapes(
    shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raises `BundleError` naming the first missing/unexpected/misshapen tensors of `source`."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing tensors ("
            + _first(f"{k} {tuple(expected[k])}" for k in missing)
            + ")"
        )
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_first(unexpected)})")
    if wrong:
        problems.append(
            f"{len(wrong)} tensors of the wrong shape ("
            + _first(f"{k} is {tuple(shapes[k])}, expected {tuple(expected[k])}" for k in wrong)
            + ")"
        )
    if problems:
        raise errors.BundleError(
            f"{source} is not the FID InceptionV3 weights (pytorch-fid's "
            f"pt_inception-2015-12-05-6726825d.pth layout): " + "; ".join(problems) + "."
        )


def params_from_torch_state_dict(
    state_dict: Mapping[str, np.ndarray], source: str = "the state_dict"
) -> dict[str, np.ndarray]:
    """pytorch-fid state_dict -> flat float32 `InceptionV3` params keyed `a/b/c`.

    `num_batches_tracked` buffers are ignored; any other missing, unknown or misshapen tensor
    raises `BundleError` naming the first few (with the expected shapes) and `source`.
    """
    tensors = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    check_param_shapes(
        {k: np.shape(v) for k, v in tensors.items()}, torch_state_dict_shapes(), source
    )
    return {torch_to_flax_name(k): _torch_to_flax_array(k, v) for k, v in tensors.items()}


def params_to_torch_state_dict(flat_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch_state_dict` (for tests and round trips)."""
    names = {torch_to_flax_name(k): k for k in torch_state_dict_shapes()}
    return {names[k]: _flax_to_torch_array(names[k], v) for k, v in flat_params.items()}


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params -> {"a/b/c": array}."""
    return tree.flatten(params, prefix)


def unflatten_params(flat: Mapping[str, Any]) -> Params:
    """{"a/b/c": array} -> nested params."""
    return tree.unflatten(flat)
