"""CUDA graphs, in one place: capture (:func:`capture_graph`: warm-up on a side stream, then capture into the
pipeline's :class:`GraphPool`), the least-recently-used set of captured graphs by signature (:class:`GraphCache`),
static buffers (:func:`static_copy` / :func:`copy_into`, and :class:`StaticBuffers`: one set per signature) and
the one :func:`signature` of a call's tensors. Used by the SD denoising loop (:mod:`ipa_rt.runtime.loop`), by
:class:`Graphed` calls (the VAE decoder, the CLIP encoder) and by the families' network inside diffusers' loops
(:class:`GraphedNetworkMixin`, :class:`StaticImage`).

A capture that fails (an op that syncs, a driver or allocator limit, a kernel that does not compile) warns once and
leaves that signature eager (:meth:`GraphCache.capture`; docs/design.md, "The static loop and CUDA graphs").
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

MAX_GRAPHS = 8  # signatures a GraphCache keeps before dropping the least recently used


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


def graphs_on(enabled: bool | None, cuda: bool) -> bool:
    """``enabled``: ``None`` = on CUDA only, ``False`` = never (engines on their own streams), ``True`` = always."""
    return enabled if enabled is not None else cuda


# --- signatures and static buffers --------------------------------------------------------------------------------
def _leaves(obj: Any) -> Iterator[Any]:
    """Tensors and other values of a structure (lists, tuples, dicts, dataclass instances) in a fixed order, each
    container announced by its type (so two structures with the same leaves in other shapes differ)."""
    if isinstance(obj, (list, tuple, dict)) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        yield type(obj)
        if isinstance(obj, dict):
            items = obj.values()
        else:
            items = obj if isinstance(obj, (list, tuple)) else (getattr(obj, f.name) for f in dataclasses.fields(obj))
        for item in items:
            yield from _leaves(item)
    else:
        yield obj


def tensors_of(obj: Any) -> list[Tensor]:
    """Every tensor of a structure, in a fixed order."""
    return [x for x in _leaves(obj) if isinstance(x, Tensor)]


def hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def signature(obj: Any) -> tuple:
    """What a graph or a static copy of ``obj`` depends on: the structure, every tensor's shape, dtype and device,
    and the other values (hashable ones as they are: a module by identity, a key tuple by value)."""
    return tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else x if hashable(x) else type(x).__name__
        for x in _leaves(obj)
    )


def static_copy(obj: Any, contiguous: bool = False) -> Any:
    """``obj`` with every tensor copied into new memory (``contiguous``, or in the same layout) and its containers
    rebuilt around them (modules and other values shared): static buffers of the same structure."""
    if isinstance(obj, Tensor):
        return obj.clone(memory_format=torch.contiguous_format if contiguous else torch.preserve_format)
    if isinstance(obj, (list, tuple)):
        return type(obj)(static_copy(x, contiguous) for x in obj)
    if isinstance(obj, dict):
        return {k: static_copy(v, contiguous) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: static_copy(getattr(obj, f.name), contiguous) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    return obj


def copy_into(static: Any, value: Any) -> None:
    """``value``'s tensors written in place into ``static``'s (the same structure), so a graph that reads ``static``
    reads them. A static tensor larger than its value (a step table sized to a capacity) takes it in its leading
    rows."""
    for dst, src in zip(tensors_of(static), tensors_of(value), strict=True):
        (dst if dst.shape == src.shape else dst[tuple(slice(0, n) for n in src.shape)]).copy_(src)


class StaticBuffers:
    """Static copies of values, one set per signature (or per the caller's ``key``): :meth:`write` copies a value in
    place into the set kept for it, allocated on first use, so a graph captured with that set still reads valid,
    current memory whenever the signature comes back."""

    def __init__(self, contiguous: bool = False) -> None:
        self.sets: dict[Hashable, Any] = {}
        self.contiguous = contiguous

    def write(self, value: Any, key: Hashable | None = None) -> Any:
        key = signature(value) if key is None else key
        static = self.sets.get(key)
        if static is None:
            static = self.sets[key] = static_copy(value, self.contiguous)
        else:
            copy_into(static, value)
        return static

    def clear(self) -> None:
        self.sets.clear()


# --- captured graphs by signature ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Captured:
    """One signature of a :class:`Graphed` call (any :class:`GraphCache` entry has ``graph`` and ``eager``)."""

    inputs: list[Tensor]
    graph: Any = None
    output: Any = None
    eager: bool = False


class GraphCache(OrderedDict):
    """Entries by signature, each with its CUDA graph once captured (``graph``) or ``eager`` after a failed capture,
    least recently used first: past ``max_entries`` the oldest is dropped with its graph and static buffers. Every
    capture goes into ``pool``; ``captures`` and ``evictions`` count for tests, stats and the benchmark."""

    def __init__(self, max_entries: int = MAX_GRAPHS, pool: GraphPool | None = None) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.pool = pool if pool is not None else GraphPool()
        self.captures = self.evictions = 0
        self.weights: tuple | None = None

    def lookup(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The entry for ``key`` (``make()`` on first use), now the most recently used."""
        entry = self.get(key)
        if entry is None:
            entry = self[key] = make()
            while len(self) > self.max_entries:
                self.popitem(last=False)
                self.evictions += 1
        self.move_to_end(key)
        return entry

    def capture(self, entry: Any, body: Callable[[], Any], device: torch.device, what: str, reset=None) -> Any:
        """``body`` captured into ``entry.graph`` (returns its output); if the capture fails, ``entry`` runs eagerly
        from now on, with one warning naming ``what``."""
        try:
            entry.graph, out = capture_graph(body, device, reset=reset, pool=self.pool)
        except CaptureFailed as exc:
            entry.eager = True
            warnings.warn(f"{what}: CUDA graph capture failed ({exc}); it runs eagerly from now on", stacklevel=3)
            return None
        self.captures += 1
        return out

    def follow(self, modules: Iterable[torch.nn.Module]) -> None:
        """Drop every entry when the weights the graphs read were moved, cast or replaced: the storage address and
        dtype of every parameter and buffer (what a captured graph reads) change with any ``.to()`` or new weight."""
        weights = tuple((t.data_ptr(), t.dtype) for m in modules for t in (*m.parameters(), *m.buffers()))
        if weights != self.weights:
            self.clear()
            self.weights = weights

    def stats(self) -> tuple[int, int]:
        """``(graphs captured, signatures running eagerly)``."""
        return sum(e.graph is not None for e in self.values()), sum(e.eager for e in self.values())


class Graphed:
    """``fn(*args, **kwargs)`` captured as a CUDA graph per call signature and replayed; elsewhere (and when
    ``enabled`` is False: see :func:`graphs_on`) the plain call. For fixed-shape calls (the VAE decoder, the CLIP
    encoder) and for a network inside a loop ipa_rt does not own (diffusers' pipelines: :class:`GraphedNetworkMixin`).

    The signature is the structure of the arguments, their non-tensor values, every tensor's shape, dtype and device,
    and what ``stage`` returns: ``stage(args, kwargs)`` runs eagerly before each replay and puts the call's image side
    into the static buffers the graph reads (:class:`StaticImage`), and the captured body runs inside ``freeze()``, so
    the image side is never computed inside a graph. Tensor arguments are copied into static inputs, outputs cloned
    out (a second replay in the same step, as classifier-free or true CFG makes, would overwrite them). Graphs are
    dropped when a weight of ``modules()`` is moved, cast or replaced; unhashable arguments run eagerly."""

    def __init__(
        self,
        fn: Callable[..., Any],
        modules: Callable[[], Iterable[torch.nn.Module]],
        name: str,
        stage: Callable[[tuple, dict], Any] | None = None,
        freeze: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.fn, self.modules, self.name = fn, modules, name
        self.stage, self.freeze = stage, freeze or contextlib.nullcontext
        self.graphs = GraphCache()
        self.enabled: bool | None = None

    def clear(self) -> None:
        """Drop every captured graph and its static buffers (their memory goes back to the pool)."""
        self.graphs.clear()
        self.graphs.weights = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        consts = tuple(None if isinstance(x, Tensor) else x for x in leaves)
        if not graphs_on(self.enabled, any(t.is_cuda for t in tensors)) or not tensors or not hashable(consts):
            return self.fn(*args, **kwargs)
        staged = self.stage(args, kwargs) if self.stage is not None else None
        self.graphs.follow(self.modules())
        entry = self.graphs.lookup((spec, consts, signature(tensors), staged), lambda: Captured(static_copy(tensors)))
        if entry.graph is None and not entry.eager:

            def body() -> Any:
                feed = iter(entry.inputs)
                a, kw = tree_unflatten([next(feed) if isinstance(x, Tensor) else x for x in leaves], spec)
                with self.freeze():
                    return self.fn(*a, **kw)

            what = f"{self.name} at {[list(t.shape) for t in tensors][:3]}"
            entry.output = self.graphs.capture(entry, body, tensors[0].device, what)
        if entry.eager:
            entry.inputs = []  # never replayed: no static inputs kept
            return self.fn(*args, **kwargs)
        copy_into(entry.inputs, tensors)
        entry.graph.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, entry.output)


# --- a family's network inside diffusers' loop (Flux, Kolors, SD3.5) ----------------------------------------------
class StaticImage:
    """An image side as a captured network reads it. Each call's prepared image state (the family's memoised,
    once-per-call object) is copied by :meth:`stage`, before a replay, into one set of static buffers per signature;
    while :meth:`frozen`, the side hands the network :attr:`current` instead of computing, so the graph reads the
    static buffers. Copies are skipped when the same prepared object is staged again (the steps of a call)."""

    def __init__(self) -> None:
        self.buffers = StaticBuffers()
        self.sources: dict[tuple, Any] = {}  # what each buffer set holds now (kept alive: identity stays valid)
        self.current: Any = None
        self.is_frozen = False

    def stage(self, prepared: Any) -> tuple:
        """Copy ``prepared`` into its buffer set (unless that set holds it already); returns the set's signature."""
        key = signature(prepared)
        if self.sources.get(key) is not prepared:
            self.buffers.write(prepared, key)
        self.sources[key], self.current = prepared, self.buffers.sets[key]
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


class GraphedNetworkMixin:
    """For ipa_rt's mixins on diffusers' pipelines: during ``__call__`` (:meth:`network_graphs`), the heavy network
    (``_graph_network``: the transformer or UNet) runs through a :class:`Graphed` forward; CUDA graphs on CUDA,
    nothing changes elsewhere. Engines (stand-ins with an ``engine``) are left alone: they run their own streams.
    A family names where its image side is (:meth:`_image_to_stage`)."""

    _graph_network = "transformer"
    _graphed: Graphed | None = None
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

    @contextlib.contextmanager
    def network_graphs(self) -> Iterator[None]:
        """The network's ``forward`` is the graphed one for the duration (wrap and restore: outside a call the
        module is untouched; a nested call, an engine or no network: nothing changes)."""
        net = getattr(self, self._graph_network, None)
        if net is None or getattr(net, "engine", None) is not None or "forward" in net.__dict__:
            yield
            return
        graphed = self._graphed
        if graphed is None or graphed.fn.__self__ is not net:  # first call, or the network was replaced
            forward = net.forward
            graphed = self._graphed = Graphed(forward, lambda: [forward.__self__], type(net).__name__,
                                              self._stage, self._freeze)  # fmt: skip
        graphed.enabled = self.cuda_graphs
        net.forward = graphed
        try:
            yield
        finally:
            del net.forward

    def graph_stats(self) -> dict[str, Any]:
        """Graphs captured for the network, signatures running eagerly (failed captures) and the pool's growth."""
        g = self._graphed
        if g is None:
            return {}
        graphs, eager = g.graphs.stats()
        return {"graphs": graphs, "eager": eager, "pool_bytes": g.graphs.pool.reserved_bytes}
