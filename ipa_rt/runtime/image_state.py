"""The per-request image state every cross-attention processor reads (:class:`ImageContext`): the runtime is its
one writer, through its methods."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .graphs import StaticBuffers


@dataclass
class ImageContext:
    """Per-request image state every cross-attention processor reads (refiners' "context" idea), changed only
    through the methods below (by the runtime, ComfyUI, ``doctor``, the export contracts); the adapter weights that
    compute it live in :class:`~ipa_rt.adapters.stack.IPAdapterStack`. ``scale``: ``[adapters, layers]``, or
    ``[rows, adapters, layers]`` in a batched call (:meth:`per_row`; always inside an engine's UNet). ``kv[layer]``:
    all image keys and values laid end to end (``[B, H, T, d]``), ``None`` without an image prompt; ``segments``:
    each segment's ``(start, end)`` token range, ``seg_offsets`` / ``seg_adapter`` the same on the device for the
    fused kernel. Each tensor lives in a static buffer set per shape key (:meth:`hold`), written in place."""

    scale: Tensor
    scale_eff: Tensor | None = None  # scale x per-step gate, rewritten by the loop each step; read by layers
    kv: list[tuple[Tensor, Tensor]] | None = None
    segments: list[tuple[int, int]] = field(default_factory=list)
    seg_offsets: Tensor | None = None
    seg_adapter: Tensor | None = None
    masks: dict[int, Tensor] = field(default_factory=dict)  # query count -> [S, B, N] regional masks
    seg_owner: Tensor | None = None  # [S] adapter of each segment (per-image segments)
    seg_mult: Tensor | None = None  # [S, L] per-image scale factors, None when segments are adapters
    prepared_key: Any = None  # the reference the buffers hold (None: unknown), for the reference cache
    store_key: tuple | None = None  # the static buffer set the layers read (a captured graph is keyed on it)
    buffers: StaticBuffers = field(default_factory=lambda: StaticBuffers(contiguous=True))
    segment_tables: dict[tuple, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # per buffer set
    row_tables: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # per row count (per_row)

    def bind(self, scale: Tensor, scale_eff: Tensor) -> None:
        """The ``[adapters, layers]`` scale tensors the layers read (the stack's buffers, again after a move)."""
        self.scale, self.scale_eff = scale, scale_eff

    def set_scale(self, table: Tensor, gated_only: bool = False) -> None:
        """The ``[adapters, layers]`` scale, written in place (nothing recaptures); ``gated_only``: only what the
        layers read, the table already gated (ComfyUI's sigma window)."""
        if not gated_only:
            self.scale.copy_(table, non_blocking=True)
        self.scale_eff.copy_(table, non_blocking=True)

    def gate(self, column: Tensor) -> None:
        """One step's adapter gate (step ranges): the layers read ``scale x column``."""
        if self.scale_eff is not None:
            torch.mul(self.scale, column, out=self.scale_eff)

    @contextlib.contextmanager
    def per_row(self, table: Tensor) -> Iterator[None]:
        """Every UNet row its own scales for one batched call: ``table`` ``[rows, A, L]`` goes into the pair of
        buffers kept for that row count (a CUDA graph captured with them keeps reading that memory); the layers
        read it instead of the ``[A, L]`` scale until the block ends."""
        rows, base = table.shape[0], (self.scale, self.scale_eff)
        if rows not in self.row_tables:
            self.row_tables[rows] = tuple(torch.empty_like(table, device=self.scale.device) for _ in range(2))
        for buf in self.row_tables[rows]:
            buf.copy_(table)
        self.scale, self.scale_eff = self.row_tables[rows]
        try:
            yield
        finally:
            self.scale, self.scale_eff = base

    def hold(self, key: tuple, prepared: Any, kv: list, bounds: list[int], owners: list[int], masks: dict, mult):
        """One request's image state into the static buffer set kept for ``key`` (segment layout, batch, device,
        dtype, mask sizes): per layer keys/values, segment tables, regional masks ``{queries: [S, B, N]}`` and
        per-image factors ``[S, L]`` (None: segments are adapters). ``prepared``: the reference it holds."""
        self.prepared_key, self.store_key = prepared, key
        device = kv[0][0].device
        if key not in self.segment_tables:  # made once per set: no host-to-device copy per request
            self.segment_tables[key] = (
                torch.tensor(bounds, dtype=torch.int32, device=device),
                torch.arange(len(bounds) - 1, dtype=torch.int32, device=device),
                torch.tensor(owners, dtype=torch.long, device=device),
            )
        self.segments = list(itertools.pairwise(bounds))
        self.seg_offsets, self.seg_adapter, self.seg_owner = self.segment_tables[key]
        self.kv, self.masks, self.seg_mult = self.buffers.write((kv, masks, mult), key=(key, mult is not None))

    def clear(self, prepared: Any = None) -> None:
        """No image prompt (``prepared``: the key of what an engine's own buffers hold, if anything)."""
        self.prepared_key, self.store_key, self.kv = prepared, None, None
        self.segments, self.masks, self.seg_mult = [], {}, None

    def forget(self) -> None:
        """The next request prepares its reference again (the caches were dropped)."""
        self.prepared_key = None

    def drop_buffers(self) -> None:
        """Forget every static buffer (after a device move the next request allocates anew)."""
        self.buffers.clear()
        self.segment_tables.clear()
        self.row_tables.clear()
        self.clear()

    def trace(self, kv: list[tuple[Tensor, Tensor]], segments: list[tuple[int, int]], scale: Tensor) -> None:
        """What an exported UNet reads: keys/values computed in the graph, the scale an input, no masks."""
        self.kv, self.segments, self.scale_eff, self.seg_mult, self.masks = kv, segments, scale, None, {}
