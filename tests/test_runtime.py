"""CUDA-free checks of the static loop's device branches: what a graph would capture, replay and read.

A CUDA graph replays the kernels it captured on the memory it captured them with. What makes that safe is
bookkeeping that runs on any device: which signature captures, when a graph is reused or dropped, which storages
a step reads, that controls write in place, that ``to()`` and a weight change drop every graph. These tests check
that bookkeeping on the CPU, with the real capture path (which fails without CUDA, exercising the eager fallback)
or with :class:`ReplayGraph`, a stand-in whose replay re-runs the captured callable.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CALL, assert_parity, diffusers_pipe, fixed_latents, ipa_pipe
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ipa_rt.runtime import graphs
from ipa_rt.runtime import loop as runtime


class ReplayGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: ``replay`` re-runs the captured callable and writes its
    output into the captured output tensor, as a graph replay rewrites the same memory."""

    def __init__(self, body, out) -> None:
        self.body, self.out = body, out

    def replay(self) -> None:
        result = self.body()
        for dst, src in zip(tree_leaves(self.out), tree_leaves(result), strict=True):  # a tensor or a structure
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


def replay_capture(body, device, reset=None, pool=None, warmup=2):
    for _ in range(warmup):
        body()
        if reset is not None:
            reset()
    out = body()
    return ReplayGraph(body, out), out


@pytest.fixture
def fake_graphs(monkeypatch):
    """Every capture goes through :func:`replay_capture` (``graphs.GraphCache.capture``: the loop and graphed calls)."""
    monkeypatch.setattr(graphs, "capture_graph", replay_capture)


def sd15(models, **kw):
    return ipa_pipe(models, "sd15", models.adapter("sd15", "plus"), **kw)


def test_loop_keeps_no_autograd_history(models, images):
    """The UNet's parameters require grad: a step run outside no_grad (as a benchmark timing the loop does) must
    still leave nothing that records history in the static buffers or the output."""
    pipe = sd15(models, scheduler="lcm")
    pipe("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **{**CALL, "guidance_scale": 1.0})
    (state,) = pipe.loop.states.values()
    assert any(p.requires_grad for p in pipe.unet.parameters())
    state.idx.zero_()
    for _ in range(state.steps):
        pipe.loop._step(state)  # deliberately outside any no_grad / inference_mode
    held = [t for t in state.tensors() if t.requires_grad or t.grad_fn is not None]
    assert not held, [tuple(t.shape) for t in held]
    ctx = pipe.adapters.context
    assert not any(t.requires_grad for kv in ctx.kv for t in kv) and not ctx.scale_eff.requires_grad


@pytest.mark.slow
def test_calls_inside_and_outside_inference_mode_share_the_static_buffers(models, images):
    """A first call under ``torch.inference_mode()`` (as benchmarks and ComfyUI run) must not leave inference tensors
    that a later call outside it writes in place (PyTorch refuses that): same outputs in, out, and in again, and for
    a batched call."""
    pipe = sd15(models, scheduler="lcm")

    def kw() -> dict:
        return dict(prompt="a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip

    with torch.inference_mode():
        first = pipe(**kw()).images
    assert not first.is_inference()
    again = [pipe(**kw()).images]
    with torch.inference_mode():
        again += [pipe(**kw()).images, pipe.batch([kw()])[0].images]
    again.append(pipe.batch([kw()])[0].images)
    assert [torch.equal(out, first) for out in again] == [True] * 4, [(out - first).abs().max().item() for out in again]


@pytest.mark.slow
def test_step_count_and_strength_share_one_signature(models, images, monkeypatch):
    """Tables are sized to a capacity: 3 and 5 steps reuse one state (parity still holds); past the capacity, a
    bigger table."""
    monkeypatch.setattr(runtime, "MIN_CAPACITY", 8)  # the rule at a size the test can step through quickly
    pipe = sd15(models, scheduler="ddim")
    ref = diffusers_pipe(models, "sd15", ["plus.safetensors"])
    ref.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    for steps in (3, 5):
        call = {**CALL, "num_inference_steps": steps}
        out = pipe("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
        assert_parity(out, ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images)
    assert len(pipe.loop.states) == 1
    (state,) = pipe.loop.states.values()
    assert state.sig.capacity == 8 and state.timesteps.shape[0] == 8
    pipe("a cat", ip_adapter_image=images[0], **{**CALL, "num_inference_steps": 9})
    assert len(pipe.loop.states) == 2  # beyond the capacity: a bigger table, a second signature
    assert [s.sig.capacity for s in pipe.loop.states.values()] == [8, 16]
    assert runtime.step_capacity(30) == 8 * 4 and runtime.step_capacity(1) == 8


@pytest.mark.slow
def test_least_recently_used_signature_is_evicted(models, images):
    pipe = sd15(models, scheduler="ddim")
    pipe.loop.states.max_entries = 2
    sizes = (32, 40, 48)
    for size in sizes:
        pipe("a cat", ip_adapter_image=images[0], **{**CALL, "height": size, "width": size})
    assert pipe.loop.states.evictions == 1 and len(pipe.loop.states) == 2
    kept = [s.sig.latents[-1] for s in pipe.loop.states.values()]
    assert kept == [20, 24]  # 40 and 48 px remain (VAE factor 2), 32 px (least recently used) was dropped
    stats = pipe.memory_stats()
    assert stats["signatures"] == 2 and stats["evictions"] == 1 and stats["static_buffer_bytes"] > 0


def test_graph_bookkeeping_with_a_replay_double(models, images, fake_graphs):
    """One capture per signature; new step counts, scales, step ranges and references replay it."""
    pipe = sd15(models, scheduler="ddim")
    pipe.loop.use_graphs = True
    ref = diffusers_pipe(models, "sd15", ["plus.safetensors"])
    ref.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    for steps, scale, image in ((3, 0.6, 0), (4, 1.3, 1), (2, 0.0, 1)):
        pipe.set_ip_adapter_scale(scale)
        ref.set_ip_adapter_scale(scale)
        call = {**CALL, "num_inference_steps": steps}
        out = pipe("a cat", ip_adapter_image=images[image], latents=fixed_latents(), **call).images
        assert_parity(out, ref("a cat", ip_adapter_image=images[image], latents=fixed_latents(), **call).images)
    assert pipe.loop.captures == 1
    (state,) = pipe.loop.states.values()
    assert isinstance(state.graph, ReplayGraph)


def test_failed_capture_runs_eagerly_with_one_warning(models, images):
    """Forcing graphs on a CPU pipeline makes the real capture fail (not a CUDA device): the signature falls back to
    the eager step, warns once, and the result is still diffusers'."""
    pipe = sd15(models, scheduler="ddim")
    pipe.loop.use_graphs = True
    for g in pipe.graphed_calls():
        g.enabled = True
    ref = diffusers_pipe(models, "sd15", ["plus.safetensors"])
    ref.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    call = {**CALL, "output_type": "pt"}
    with pytest.warns(UserWarning, match="CUDA graph capture failed") as caught:
        out = pipe("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
    names = {str(w.message).split(":")[0] for w in caught}
    assert any("denoising step" in n for n in names) and any("VAE decoder" in n for n in names)
    assert any("CLIP image encoder" in n for n in names)
    assert_parity(out, ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the failure is remembered per signature / shape
        pipe("a cat", ip_adapter_image=images[1], latents=fixed_latents(), **call)
    (state,) = pipe.loop.states.values()
    assert state.eager and state.graph is None and pipe.memory_stats()["eager_signatures"] == 1


def test_to_drops_every_graph_and_buffer(models, images, fake_graphs):
    pipe = sd15(models, scheduler="ddim")
    pipe.loop.use_graphs = True
    for g in pipe.graphed_calls():
        g.enabled = True
    pipe("a cat", ip_adapter_image=images[0], **{**CALL, "output_type": "pt"})
    assert pipe.loop.captures == 1 and all(len(g.graphs) for g in pipe.graphed_calls()[:2])
    ctx = pipe.adapters.context
    assert ctx.buffers.sets and ctx.kv is not None
    old_pool = pipe.graph_pool
    pipe.to("cpu")
    assert not pipe.loop.states and pipe.loop.captures == 0
    assert not any(g.graphs for g in pipe.graphed_calls()) and pipe.graph_pool is not old_pool
    assert not ctx.buffers.sets and ctx.kv is None and ctx.prepared_key is None


def test_graphed_call_is_keyed_on_the_weights(models, fake_graphs):
    """A dtype change of the module (diffusers' SDXL pipeline upcasting a shared VAE does this) drops the graphs
    captured on the old weights instead of replaying freed memory."""
    pipe = sd15(models)
    decoder = pipe.decoder
    decoder.enabled = True
    z = fixed_latents()
    first = decoder(z)
    assert len(decoder.graphs) == 1
    (entry,) = decoder.graphs.values()
    pipe.vae.to(torch.float64)
    again = decoder(z.double())
    assert len(decoder.graphs) == 1 and next(iter(decoder.graphs.values())) is not entry
    assert torch.allclose(again.float(), first, atol=1e-4)
    pipe.vae.to(torch.float32)
    assert torch.equal(decoder(z), first)


def _graphed_linear():
    net = torch.nn.Linear(4, 3)
    calls = []

    def forward(x, *, shift=0.0, extra=None):
        calls.append(shift)
        return (net(x) + shift, {"twice": 2 * x})

    forward.__self__ = net  # a bound method's handle on its module (GraphedNetworkMixin reads it)
    return net, forward, calls


def test_graphed_forward_signatures_outputs_and_weights(fake_graphs):
    """Graphed (diffusers' loops): one graph per signature (tensor shapes and non-tensor values), replays
    write static inputs and hand out clones (a second replay must not overwrite the first's output), a weight
    change drops every graph, the least recently used graph goes beyond MAX_GRAPHS, and arguments that cannot key
    a graph (unhashable values) run eagerly."""
    net, forward, calls = _graphed_linear()
    g = graphs.Graphed(forward, lambda: [net], "linear")
    g.enabled = True
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        out_x, out_y = g(x, shift=1.0), g(y, shift=1.0)
        assert len(g.graphs) == 1
        assert torch.equal(out_x[0], net(x) + 1.0) and torch.equal(out_y[1]["twice"], 2 * y)  # x's not overwritten
        g(x, shift=2.0)
        g(torch.randn(5, 4), shift=1.0)
        assert len(g.graphs) == 3
        with torch.no_grad():
            net.weight.add_(1.0)  # in place: same storage, the graph still reads it
        assert torch.equal(g(x, shift=1.0)[0], net(x) + 1.0) and len(g.graphs) == 3
        net.weight = torch.nn.Parameter(net.weight.detach().clone())  # a replaced weight: every graph dropped
        assert torch.equal(g(x, shift=1.0)[0], net(x) + 1.0) and len(g.graphs) == 1
        for n in range(graphs.MAX_GRAPHS + 2):
            g(torch.randn(n + 1, 4), shift=3.0)
        assert len(g.graphs) == graphs.MAX_GRAPHS
        before = len(calls)
        g(x, shift=1.0, extra=[{"unhashable": set()}])  # runs eagerly: exactly one call, nothing captured
        assert len(calls) == before + 1 and len(g.graphs) == graphs.MAX_GRAPHS


def test_graphed_forward_falls_back_when_capture_fails():
    """Without CUDA the real capture fails: that signature runs eagerly from then on, with one warning, and the
    results are the plain forward's."""
    net, forward, _ = _graphed_linear()
    g = graphs.Graphed(forward, lambda: [net], "linear")
    g.enabled = True
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="linear at .*CUDA graph capture failed"), torch.no_grad():
        first = g(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.equal(g(x)[0], first[0]) and torch.equal(first[0], net(x))
    assert g.graphs.stats() == (0, 1)  # one signature, eager; no graph


class StorageReads(TorchDispatchMode):
    """Records the storage of every tensor an op reads that was not produced inside the recorded region."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[int] = set()
        self.made: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)
        }
        self.read |= inputs - {0}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):  # new storage only: a view or an in-place op's output aliases an input
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made.add(t.untyped_storage().data_ptr())
        return out

    @property
    def foreign(self) -> frozenset[int]:
        return frozenset(self.read - self.made)


def step_reads(pipe) -> frozenset[int]:
    """Storages the last request's first step reads from outside the step (what a graph would bake in)."""
    state = next(reversed(pipe.loop.states.values()))
    state.idx.zero_()
    with StorageReads() as reads:
        pipe.loop._step(state)
    return reads.foreign


@pytest.mark.slow
def test_a_step_reads_the_same_storage_for_every_request(models, images, tmp_path):
    """What a captured graph needs: two requests of one signature (other reference, scale, prompt, guidance, step
    count, ControlNet and T2I images) make the step read exactly the same storages. The check itself is shown to
    catch a buffer reallocated between requests."""
    from ipa_rt import testing as T

    net = T.write_controlnet(tmp_path / "cn", models.base("sd15"))
    adapter = T.write_t2i_adapter(tmp_path / "t2i", models.base("sd15"))
    pipe = sd15(models, scheduler="euler_a", controlnet=net, t2i_adapter=adapter)
    structure = [T.make_image(seed=s, size=(32, 32)) for s in (4, 5)]

    def request(i, scale, steps):
        pipe.set_ip_adapter_scale(scale)
        call = {**CALL, "num_inference_steps": steps, "guidance_scale": 3.0 + i}
        pipe(f"prompt {i}", ip_adapter_image=images[i], image=structure[i], adapter_image=structure[i], **call)
        return step_reads(pipe)

    first = request(0, 0.5, 3)
    second = request(1, 1.5, 4)
    assert len(pipe.loop.states) == 1 and first == second
    ctx = pipe.adapters.context
    ctx.kv = [(k.clone(), v.clone()) for k, v in ctx.kv]  # what the old per-request K/V allocation did
    assert step_reads(pipe) != first
