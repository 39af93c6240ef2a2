"""vitvq: ViT-VQGAN image tokenizers and VIM image models in JAX/Flax.

Importing this package does not import TensorFlow.
"""

from vitvq.errors import BundleError, ConfigError, DataError, InputError, VitvqError

__version__ = "0.1.0"

__all__ = ["BundleError", "ConfigError", "DataError", "InputError", "VitvqError", "__version__"]
