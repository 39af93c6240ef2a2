"""The test suite's persistent compilation cache stays writable: an entry left without its
access-time file (a process SIGKILLed between JAX's two writes) is repaired, and JAX then
writes new entries again (in-process, with JAX's own cache class on a temporary folder)."""

import pytest
from conftest import repair_compilation_cache
from jax._src import lru_cache  # the class JAX's persistent cache uses when it has a size cap


def test_an_entry_without_its_atime_blocks_every_write_until_repaired(tmp_path):
    cache = lru_cache.LRUCache(str(tmp_path), max_size=1 << 20)
    cache.put("first", b"a" * 100)
    assert cache.get("first") == b"a" * 100
    (tmp_path / "first-atime").unlink()  # as if killed between the two writes

    with pytest.raises(FileNotFoundError):  # JAX catches this and only warns
        cache.put("second", b"b" * 100)
    assert cache.get("second") is None

    assert repair_compilation_cache(tmp_path) == 1
    assert repair_compilation_cache(tmp_path) == 0  # nothing left to repair
    cache.put("second", b"b" * 100)
    assert cache.get("first") == b"a" * 100 and cache.get("second") == b"b" * 100
    # Eviction works again: the least recently read entry goes first.
    cache.put("third", b"c" * ((1 << 20) - 150))
    assert cache.get("first") is None
    assert cache.get("second") == b"b" * 100 and cache.get("third") is not None
