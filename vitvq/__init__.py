"""vitvq: ViT-VQGAN image tokenizers and VIM image models in JAX/Flax.

Importing this package does not import TensorFlow (nor JAX, until a loader is used):

    tok = vitvq.load_tokenizer(BUNDLE)   # see vitvq.tokenizer
"""

from vitvq.errors import BundleError, ConfigError, DataError, InputError, VitvqError
from vitvq.version import __version__

__all__ = [
    "BundleError",
    "ConfigError",
    "DataError",
    "InputError",
    "VitvqError",
    "__version__",
    "load_sampler",
    "load_tokenizer",
]


def load_tokenizer(path, **kwargs):
    """The tokenizer of a bundle: `encode` uint8 images -> codes, `decode` codes -> images.

    See `vitvq.tokenizer.load_tokenizer` for the keyword arguments.
    """
    # deferred: keeps `import vitvq` free of JAX (see the module docstring)
    from vitvq.tokenizer import load_tokenizer as _load

    return _load(path, **kwargs)


def load_sampler(path, **kwargs):
    """The VIM and tokenizer of a bundle: `sample(num_samples, class_labels, ...)` -> images.

    See `vitvq.sampler.load_sampler` for the keyword arguments.
    """
    # deferred: keeps `import vitvq` free of JAX (see the module docstring)
    from vitvq.sampler import load_sampler as _load

    return _load(path, **kwargs)
