"""A persistent JAX compilation cache for a block of tests (repeated runs compile once)."""

import contextlib

import jax

_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@contextlib.contextmanager
def persistent_compilation_cache(directory: str):
    """Caches compiles taking >= 0.5 s in `directory`; restores the previous settings after."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = {name: getattr(jax.config, name) for name in _OPTIONS}
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.set_cache_dir(directory)
    cc.reset_cache()  # the cache is set up at the first compile of the process: redo it
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        cc.reset_cache()
