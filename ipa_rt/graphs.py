"""CUDA graph capture, in one place: warm-up and capture (:func:`capture_graph`), one memory pool per pipeline
(:class:`GraphPool`), and :class:`Graphed` for fixed-shape calls (the VAE decoder, the CLIP encoder).

A capture can fail on a user's machine for reasons no CPU test can rule out (an op that syncs, a driver or
allocator limit, a kernel that does not compile). Callers catch :class:`CaptureFailed`, warn once and run that
signature eagerly: an optimisation never fails a user's call.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class CaptureFailed(RuntimeError):
    """A CUDA graph capture failed; the caller runs eagerly instead."""


class GraphPool:
    """The memory pool every graph of one pipeline is captured into, and what the captures reserved.

    Graphs of one pipeline never replay concurrently, and everything that must survive from one replay to the
    next lives in static buffers allocated outside the pool, so the graphs can share one pool: a new step count,
    strength or request shape then reuses the activation memory of the earlier captures instead of adding its own.
    """

    def __init__(self) -> None:
        self.handle: Any = None
        self.reserved_bytes = 0  # growth of the CUDA caching allocator's reserve across captures

    def get(self) -> Any:
        if self.handle is None:
            self.handle = torch.cuda.graph_pool_handle()
        return self.handle


def capture_graph(
    body: Callable[[], Any],
    device: torch.device,
    reset: Callable[[], None] | None = None,
    pool: GraphPool | None = None,
    warmup: int = 2,
) -> tuple[Any, Any]:
    """``body`` captured as a CUDA graph: ``warmup`` eager runs on a side stream first (cuBLAS/cuDNN workspaces,
    Triton compiles, lazy inits), ``reset`` after each to undo what a run advanced. Returns ``(graph, output of
    the captured call)``; raises :class:`CaptureFailed` with the cause (``device``: where ``body``'s tensors live;
    work on any other device would silently be left out of the graph)."""
    if device.type != "cuda":
        raise CaptureFailed(f"{device} is not a CUDA device")
    try:
        before = torch.cuda.memory_reserved()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                body()
                if reset is not None:
                    reset()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool.get() if pool is not None else None):
            out = body()
    except Exception as exc:  # any failure: the caller falls back to eager execution
        with contextlib.suppress(Exception):  # a poisoned context reports its own error on the next call
            torch.cuda.synchronize()
        raise CaptureFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if pool is not None:
        pool.reserved_bytes += max(0, torch.cuda.memory_reserved() - before)
    return graph, out


def warn_eager(what: str, exc: Exception) -> None:
    warnings.warn(f"{what}: CUDA graph capture failed ({exc}); it runs eagerly from now on", stacklevel=3)


def weights_key(modules: Iterable[torch.nn.Module]) -> tuple:
    """Storage address and dtype of every parameter and buffer: a captured graph reads exactly these, so any
    ``.to()`` (device or dtype) or replaced weight changes the key."""
    out = []
    for m in modules:
        out += [(t.data_ptr(), t.dtype) for t in m.parameters()]
        out += [(t.data_ptr(), t.dtype) for t in m.buffers()]
    return tuple(out)


class Graphed:
    """``fn(x)`` from a static input buffer: on CUDA captured as a CUDA graph per input shape and dtype and
    replayed, elsewhere a plain call. Returns a fresh tensor each call.

    Graphs are keyed on the storage of the weights ``fn`` runs (``modules()``): when a module is moved or cast
    (``Pipeline.to``, diffusers' SDXL pipeline upcasting a shared VAE) every graph and static buffer is dropped and
    recaptured, so a replay never reads freed memory. ``enabled``: ``None`` = on CUDA only, ``False`` = never
    (engines that run on their own streams), ``True`` = always (tests)."""

    def __init__(
        self, fn: Callable[[Tensor], Tensor], modules: Callable[[], Iterable[torch.nn.Module]], name: str
    ) -> None:
        self.fn, self.modules, self.name = fn, modules, name
        self.graphs: dict[tuple, tuple[Any, Tensor, Tensor]] = {}
        self.eager: set[tuple] = set()  # shapes whose capture failed
        self.enabled: bool | None = None
        self.pool: GraphPool | None = None
        self._weights: tuple | None = None

    def clear(self) -> None:
        """Drop every captured graph and its static buffers (their memory goes back to the pool)."""
        self.graphs.clear()
        self.eager.clear()
        self._weights = None

    def __call__(self, x: Tensor) -> Tensor:
        on = self.enabled if self.enabled is not None else x.device.type == "cuda"
        if not on:
            return self.fn(x)
        weights = weights_key(self.modules())
        if weights != self._weights:
            self.clear()
            self._weights = weights
        key = (tuple(x.shape), x.dtype, x.device)
        if key in self.eager:
            return self.fn(x)
        if key not in self.graphs:
            static_in = x.clone()
            try:
                graph, static_out = capture_graph(lambda: self.fn(static_in), x.device, pool=self.pool)
            except CaptureFailed as exc:
                warn_eager(f"{self.name} at {list(x.shape)}", exc)
                self.eager.add(key)
                return self.fn(x)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()
