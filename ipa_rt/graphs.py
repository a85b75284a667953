"""CUDA graph capture, in one place: warm-up and capture (:func:`capture_graph`), one memory pool per pipeline
(:class:`GraphPool`), :class:`Graphed` for fixed-shape calls (the VAE decoder, the CLIP encoder), and
:class:`GraphedForward` for a network inside a loop ipa_rt does not own (diffusers' Flux, Kolors and SD3.5 pipelines).

A capture can fail on a user's machine for reasons no CPU test can rule out (an op that syncs, a driver or
allocator limit, a kernel that does not compile). Callers catch :class:`CaptureFailed`, warn once and run that
signature eagerly: an optimisation never fails a user's call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


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


# --- a network inside someone else's loop (diffusers' pipelines for Flux, Kolors, SD3.5) -------------------------
MAX_GRAPHS = 8  # signatures a GraphedForward keeps before dropping the least recently used


def twin(obj: Any) -> Any:
    """``obj`` with every tensor cloned (lists, tuples, dicts and dataclass instances rebuilt around them; modules
    and anything else shared): static buffers of the same structure."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(twin(x) for x in obj)
    if isinstance(obj, dict):
        return {k: twin(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: twin(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def _leaves(obj: Any) -> Iterator[Any]:
    """The walk :func:`twin` makes, flattened: tensors and other values in a fixed order, each container announced
    by its type (so two structures with the same leaves in other shapes differ)."""
    if isinstance(obj, (list, tuple, dict)) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        yield type(obj)
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else None
        if items is None:
            items = (getattr(obj, f.name) for f in dataclasses.fields(obj))
        for item in items:
            yield from _leaves(item)
    else:
        yield obj


def tensors_of(obj: Any) -> list[Tensor]:
    """Every tensor of a structure :func:`twin` copies, in a fixed order."""
    return [x for x in _leaves(obj) if isinstance(x, Tensor)]


def _signature(obj: Any) -> tuple:
    """What the static twin of ``obj`` depends on: the structure, every tensor's shape, dtype and device, and the
    other values (hashable ones as they are: a module by identity, a key tuple by value)."""
    return tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else x if _hashable((x,)) else type(x).__name__
        for x in _leaves(obj)
    )


class StaticImage:
    """An image side as a captured network reads it. Each call's prepared image state (the family's memoised,
    once-per-call object) is copied by :meth:`stage`, before a replay, into one set of static buffers per shape
    signature; while :meth:`frozen`, the side hands the network :attr:`current` instead of computing, so the graph
    reads the static buffers. Copies are skipped when the same prepared object is staged again (the steps of a call)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, Any] = {}
        self.sources: dict[tuple, Any] = {}  # what each buffer set holds now (kept alive: identity stays valid)
        self.current: Any = None
        self.is_frozen = False

    def stage(self, prepared: Any) -> tuple:
        key = _signature(prepared)
        static = self.buffers.get(key)
        if static is None:
            static = self.buffers[key] = twin(prepared)
        elif self.sources.get(key) is not prepared:
            for dst, src in zip(tensors_of(static), tensors_of(prepared), strict=True):
                dst.copy_(src)
        self.sources[key] = prepared
        self.current = static
        return key

    def clear(self) -> None:
        self.buffers.clear()
        self.sources.clear()
        self.current = None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.is_frozen = True
        try:
            yield
        finally:
            self.is_frozen = False


class GraphedForward:
    """A module's ``forward`` called by a loop ipa_rt does not own (diffusers' pipelines), captured as a CUDA graph
    per call signature and replayed; everywhere else (and when ``enabled`` is False) the plain forward.

    The signature is the structure of the arguments, their non-tensor values, every tensor's shape, dtype and device,
    and what ``stage`` returns: ``stage(args, kwargs)`` runs eagerly before each replay and puts the call's image side
    into the static buffers the graph reads (:class:`StaticImage`), and the captured body runs inside ``freeze()``, so
    the image side is never computed inside a graph. Tensor arguments are copied into static inputs, outputs cloned
    out (a second replay in the same step, as classifier-free or true CFG makes, would overwrite them). Graphs are
    dropped when a weight is moved, cast or replaced; a failed capture runs that signature eagerly (one warning)."""

    def __init__(
        self,
        forward: Callable[..., Any],
        modules: Callable[[], Iterable[torch.nn.Module]],
        name: str,
        stage: Callable[[tuple, dict], Any] | None = None,
        freeze: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.forward, self.modules, self.name = forward, modules, name
        self.stage, self.freeze = stage, freeze or contextlib.nullcontext
        self.graphs: OrderedDict[tuple, tuple[Any, list[Tensor], Any]] = OrderedDict()
        self.eager: set[tuple] = set()
        self.enabled: bool | None = None
        self.pool = GraphPool()
        self._weights: tuple | None = None

    def clear(self) -> None:
        self.graphs.clear()
        self.eager.clear()
        self._weights = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        on = self.enabled if self.enabled is not None else any(t.is_cuda for t in tensors)
        consts = tuple(None if isinstance(x, Tensor) else x for x in leaves)
        if not on or not tensors or not _hashable(consts):
            return self.forward(*args, **kwargs)
        staged = self.stage(args, kwargs) if self.stage is not None else None
        weights = weights_key(self.modules())
        if weights != self._weights:
            self.clear()
            self._weights = weights
        key = (spec, consts, tuple((tuple(t.shape), t.dtype, t.device) for t in tensors), staged)
        if key in self.eager:
            return self.forward(*args, **kwargs)
        if key not in self.graphs:
            static_in = [t.clone() for t in tensors]

            def body(static_in: list[Tensor] = static_in) -> Any:
                feed = iter(static_in)
                a, kw = tree_unflatten([next(feed) if isinstance(x, Tensor) else x for x in leaves], spec)
                with self.freeze():
                    return self.forward(*a, **kw)

            try:
                graph, static_out = capture_graph(body, tensors[0].device, pool=self.pool)
            except CaptureFailed as exc:
                warn_eager(f"{self.name} at {[list(t.shape) for t in tensors][:3]}", exc)
                self.eager.add(key)
                return self.forward(*args, **kwargs)
            self.graphs[key] = (graph, static_in, static_out)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static_in, static_out = self.graphs[key]
        for dst, src in zip(static_in, tensors, strict=True):
            dst.copy_(src)
        graph.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, static_out)


def _hashable(values: tuple) -> bool:
    try:
        hash(values)
    except TypeError:
        return False
    return True


@contextlib.contextmanager
def forward_replaced(module: torch.nn.Module, graphed: GraphedForward | None) -> Iterator[None]:
    """``module.forward`` is ``graphed`` for the duration (wrap and restore: outside a call the module is untouched)."""
    if graphed is None or "forward" in module.__dict__:  # none, or already inside (a nested call)
        yield
        return
    module.forward = graphed
    try:
        yield
    finally:
        del module.forward


class GraphedNetworkMixin:
    """For ipa_rt's mixins on diffusers' pipelines: during ``__call__`` (:meth:`network_graphs`), the heavy network
    (``_graph_network``: the transformer or UNet) runs through a :class:`GraphedForward`; CUDA graphs on CUDA,
    nothing changes elsewhere. Engines (stand-ins with an ``engine``) are left alone: they run their own streams.
    A family names where its image side is (:meth:`_image_to_stage`)."""

    _graph_network = "transformer"
    _graphed: GraphedForward | None = None
    _staged_image: StaticImage | None = None
    cuda_graphs: bool | None = None  # None: on CUDA; False: never; True: always (tests, with a capture stand-in)

    def set_cuda_graphs(self, enabled: bool | None) -> None:
        """``None`` (default): capture the network's calls as CUDA graphs on CUDA; ``False``: never."""
        self.cuda_graphs = enabled
        if self._graphed is not None:
            self._graphed.enabled = enabled

    def _image_to_stage(self, kwargs: dict) -> tuple[StaticImage, Any] | None:
        """The image side's static buffers and this call's prepared state (eager, memoised), or None."""
        return None

    def _stage(self, args: tuple, kwargs: dict) -> Any:
        found = self._image_to_stage(kwargs)
        self._staged_image = found[0] if found is not None else None
        return found[0].stage(found[1]) if found is not None else None

    def _freeze(self) -> contextlib.AbstractContextManager:
        return self._staged_image.frozen() if self._staged_image is not None else contextlib.nullcontext()

    def network_graphs(self) -> contextlib.AbstractContextManager:
        net = getattr(self, self._graph_network, None)
        if net is None or getattr(net, "engine", None) is not None or "forward" in net.__dict__:
            return contextlib.nullcontext()
        graphed = self._graphed
        if graphed is None or graphed.forward.__self__ is not net:  # first call, or the network was replaced
            forward = net.forward
            graphed = self._graphed = GraphedForward(forward, lambda: [forward.__self__], type(net).__name__,
                                                     self._stage, self._freeze)  # fmt: skip
        graphed.enabled = self.cuda_graphs
        return forward_replaced(net, graphed)

    def graph_stats(self) -> dict[str, Any]:
        """Graphs captured for the network, signatures running eagerly (failed captures) and the pool's growth."""
        g = self._graphed
        return {"graphs": len(g.graphs), "eager": len(g.eager), "pool_bytes": g.pool.reserved_bytes} if g else {}
