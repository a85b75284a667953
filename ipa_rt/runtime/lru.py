"""Bounded least-recently-used caches of tensors, per pipeline: the reference cache and the text-embedding cache.

Entries are bound to the modules that computed them (:meth:`LRUCache.bind`): other adapters, image encoder or text
encoders than on the last lookup drop every entry, so a stale entry is never served even by a caller that forgot to
clear the cache (docs/guides/modes.md, "What is cached between calls").
"""

from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from collections.abc import Hashable
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from .graphs import tensors_of

REFERENCE_CACHE_ENV = "IPA_RT_REFERENCE_CACHE_MB"
DEFAULT_REFERENCE_CACHE_MB = 512.0
REFERENCE_CACHE_ENTRIES = 256  # besides the bytes: keeps per-entry bookkeeping small when entries are tiny
TEXT_CACHE_ENTRIES = 32


def reference_cache_bytes() -> int:
    """The reference cache's bound: ``$IPA_RT_REFERENCE_CACHE_MB`` megabytes (MiB), 512 when unset, 0 turns it off."""
    raw = os.environ.get(REFERENCE_CACHE_ENV, "").strip()
    if not raw:
        return int(DEFAULT_REFERENCE_CACHE_MB * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        mb = math.nan
    if not math.isfinite(mb) or mb < 0:
        raise ConfigError(
            f"{REFERENCE_CACHE_ENV} is {raw!r}; expected a number of megabytes >= 0 (0 turns the reference cache "
            f"off; unset: {DEFAULT_REFERENCE_CACHE_MB:g})"
        )
    return int(mb * 2**20)


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensor storages ``value`` keeps alive (tensors in lists, tuples, dicts and dataclasses; a storage
    shared by several views counted once)."""
    storages = {s.data_ptr(): s.nbytes() for s in (t.untyped_storage() for t in tensors_of(value))}
    return sum(storages.values())


def _kind(key: Hashable) -> str:
    """What an entry holds, for the statistics: a key's leading string (``"encoder"``, ``"image_side"``, ...)."""
    return key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else "entry"


class LRUCache:
    """Least recently used entries are dropped first, past ``max_bytes`` bytes of tensor storage or ``max_entries``
    entries (``None``: no bound of that kind). An entry larger than ``max_bytes`` is not kept at all. Values are
    returned as stored: callers copy from them and never write into them."""

    def __init__(self, name: str, max_bytes: int | None = None, max_entries: int | None = None) -> None:
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # key -> (value, bytes), oldest first
        self.bytes = 0
        self.name, self.max_entries = name, max_entries
        self._max_bytes = max_bytes
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self.evictions = 0
        self._owner: tuple = ()

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        """A new bound applies at once: entries past it are dropped, least recently used first."""
        self._max_bytes = value
        self._trim()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def bind(self, *owner: Any) -> None:
        """The entries belong to these objects (the modules that computed them): if any is another object than at
        the last ``bind``, every entry is dropped."""
        if len(owner) != len(self._owner) or any(a is not b for a, b in zip(owner, self._owner, strict=False)):
            self.clear()
            self._owner = owner

    def get(self, key: Hashable) -> Any | None:
        """The value stored under ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses[_kind(key)] += 1
            return None
        self._entries.move_to_end(key)
        self.hits[_kind(key)] += 1
        return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` under ``key``, dropping the least recently used entries past the bounds."""
        self.discard(key)
        size = tensor_bytes(value)
        if (self.max_bytes is not None and size > self.max_bytes) or self.max_entries == 0:
            return  # larger than the whole bound: keeping it would only evict everything else
        self._entries[key] = (value, size)
        self.bytes += size
        self._trim()

    def _trim(self) -> None:
        while (self.max_bytes is not None and self.bytes > self.max_bytes) or (
            self.max_entries is not None and len(self._entries) > self.max_entries
        ):
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def discard(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        """Drop every entry (and the owner binding); the hit, miss and eviction counts stay."""
        self._entries.clear()
        self.bytes = 0
        self._owner = ()

    def stats(self) -> dict[str, Any]:
        """Entries, bytes, bounds, evictions, and hits / misses in total and per kind of entry."""
        kinds = sorted(set(self.hits) | set(self.misses))
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "max_entries": self.max_entries,
            "hits": sum(self.hits.values()),
            "misses": sum(self.misses.values()),
            "evictions": self.evictions,
            "by_kind": {k: {"hits": self.hits[k], "misses": self.misses[k]} for k in kinds},
        }


def tensor_identity(t: Any) -> tuple:
    """What makes a tensor "the same" between denoising steps: the object, its storage and its version counter."""
    if not isinstance(t, Tensor):
        return (id(t),)
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        version = None
    return (id(t), t.data_ptr(), version)


class IdentityMemo:
    """Values computed from tensors diffusers' loops pass unchanged at every step (a call's image embeddings),
    recognised by identity: the step-independent image side is computed once per call, not per step. The inputs are
    held with the value, so no other object can take their identity while it is remembered; ``size`` entries are
    kept (a call's conditional and negative embeddings, and a spare)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[list, Any]] = OrderedDict()

    def get(self, inputs: list) -> Any | None:
        key = tuple(tensor_identity(t) for t in inputs)
        hit = self._entries.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], inputs, strict=True)):
            return None
        self._entries.move_to_end(key)
        return hit[1]

    def put(self, inputs: list, value: Any) -> Any:
        self._entries[tuple(tensor_identity(t) for t in inputs)] = (list(inputs), value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
