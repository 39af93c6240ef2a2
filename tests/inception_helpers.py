"""Random FID InceptionV3 weights for tests (the real ones are never downloaded)."""

import numpy as np

from vitvq.models import inception


def random_inception_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights that keep activations O(1) through the network (He init, mild BN statistics)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in inception.flax_param_shapes().items():
        if name.endswith("conv/kernel"):
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:3]))
        elif name.endswith(("bn/scale", "bn/var")):
            value = rng.uniform(0.5, 1.5, size=shape)
        elif name == "fc/kernel":
            value = rng.normal(size=shape) / np.sqrt(shape[0])
        else:
            value = rng.normal(scale=0.1, size=shape)
        flat[name] = value.astype(np.float32)
    return flat
