"""What every model family ipa_rt runs inside diffusers' own pipeline classes shares (Flux.1/Chroma, Kolors, SD3.5).

A family is one :class:`Family` (its spec) and one pipeline mixin on :class:`FamilyMixin`; from them come, once for
every family, the torch-or-engine choice of ``from_pretrained``, the engine build and the loader (docs/design.md,
"Families inside diffusers' pipelines": what the spec and the mixin hold).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .. import console
from ..adapters.checkpoint import HUB_KWARGS, adapter_sources
from ..adapters.conditions import ReferenceCacheMixin
from ..console import hushed
from ..errors import ConfigError, reject_engine_options
from ..models import declared_pipeline, load_image_encoder, load_pipeline, read_json, wrapped_pipeline_class
from ..runtime.graphs import GraphedNetworkMixin

if TYPE_CHECKING:
    from ..export.contracts import Contract

ABSENT = object()  # an attribute the network did not have before the adapter
BLOCKS = "transformer_blocks."  # Flux's double-stream and SD3's joint blocks: the ones with an image branch


def block_processors(transformer: nn.Module) -> list[str]:
    """The image-branch blocks' processor names in diffusers' ``attn_processors`` order (the adapters' block
    indices)."""
    return [n for n in transformer.attn_processors if n.startswith(BLOCKS)]


@dataclass
class Export:
    """What a family's build hands the engine writer: the contract, what the manifest records beside the common
    fields, and a scope the export runs in (Kolors: the UNet as without an adapter)."""

    contract: Contract
    image_encoder: str | None
    record: dict[str, Any] = field(default_factory=dict)
    scope: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)


class Family:
    """One family's spec; a subclass per family overrides the hooks below (one instance each: ``FAMILY``)."""

    kind: str  # the engines' kind (manifest, cache folder names)
    title: str  # for messages: "Flux-family", ...
    module: str  # where its pipeline classes live: ``ipa_rt.flux``
    pipelines: tuple[str, ...]  # diffusers' classes it serves, by name
    mixin: type  # its pipeline mixin (a :class:`FamilyMixin`)
    network: str  # the heavy network's component name: what engines replace
    base_parts: tuple[str, ...]  # what of the base model an engine's numbers come from
    default_weight: str | None = None  # load_ip_adapter's default weight_name, where diffusers has one

    def runtime_class(self, name: str) -> type:
        """``class <name>(mixin, diffusers.<name>)``, made once (``ipa_rt.<family>.<name>`` is it)."""
        return wrapped_pipeline_class(name, mixin=self.mixin, names=self.pipelines, module=self.module)

    def module_getattr(self, name: str) -> type:
        """The family package's ``__getattr__``: pipeline classes made on first use (importing diffusers' pipelines
        takes seconds, and ``import ipa_rt.flux`` should not pay it)."""
        if name in self.pipelines:
            return self.runtime_class(name)
        package = sys.modules[type(self).__module__.rpartition(".")[0]]  # the family's package, for its public path
        if name in package.__all__:
            return getattr(package, name)
        raise AttributeError(f"module {self.module!r} has no attribute {name!r}")

    # --- PyTorch -------------------------------------------------------------------------------------------------
    def load_encoder(self, location: str, dtype: torch.dtype) -> nn.Module | None:
        """The image encoder at a path or hub id given to ``from_pretrained``; None: ``load_ip_adapter`` takes it."""
        with hushed(bars=True):
            return load_image_encoder(location, dtype)

    def adapter_arguments(self, ip_adapter: Any, subfolder: Any, weight_name: Any, encoder: Any, dtype: torch.dtype):
        """``(source, keyword arguments)`` for the pipeline's ``load_ip_adapter``; ``encoder`` is what
        :meth:`load_encoder` left to it."""
        return ip_adapter, {"subfolder": subfolder, "weight_name": weight_name}

    def load_torch(
        self, name: str, base: Any, ip_adapter: Any, image_encoder: Any, *, subfolder: Any = None,
        weight_name: Any = None, device: Any = "cpu", dtype: torch.dtype = torch.float32, **hub_kwargs: Any,
    ) -> Any:  # fmt: skip
        """The pipeline of class ``name`` on PyTorch, its image encoder registered and its adapter(s) loaded."""
        pipe = load_pipeline(self.runtime_class(name), base, dtype, device, hub_kwargs)
        if isinstance(image_encoder, (str, os.PathLike)):
            image_encoder = self.load_encoder(os.fspath(image_encoder), dtype) or image_encoder
        if isinstance(image_encoder, nn.Module):
            pipe.register_modules(image_encoder=image_encoder.to(device=device, dtype=dtype).eval())
            image_encoder = None
        if ip_adapter is not None:
            source, kw = self.adapter_arguments(ip_adapter, subfolder, weight_name, image_encoder, dtype)
            pipe.load_ip_adapter(source, **kw, **{k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS})
        return pipe

    def from_pretrained(
        self, name: str, base: Any, ip_adapter: Any, image_encoder: Any, *, backend: str,
        engine_options: dict[str, Any] | None = None, subfolder: Any = None, weight_name: Any = None,
        device: Any = "cpu", dtype: torch.dtype = torch.float32, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """``ipa_rt.Pipeline.from_pretrained`` for a folder of this family: on PyTorch, or with the heavy network as an
        engine of ``backend`` built into the cache once (then reused)."""
        if backend == "torch":
            reject_engine_options(engine_options)
            return self.load_torch(name, base, ip_adapter, image_encoder, subfolder=subfolder,
                                   weight_name=weight_name, device=device, dtype=dtype, **kwargs)  # fmt: skip
        given = sorted(k for k, v in kwargs.items() if v is not None)
        if dtype != torch.float32 or given:  # engines are built from files and take float32 inputs
            raise ConfigError(
                f"from_pretrained(backend={backend!r}) of a {self.title} model takes ip_adapter, image_encoder, "
                "subfolder, weight_name, device and engine_options (the engine's precision: "
                f"engine_options['precision']); got {given or 'dtype=' + str(dtype)}"
            )
        options = {"class_name": name, "subfolder": subfolder, "weight_name": weight_name}
        return self.open_engine(self.build_engines(base, ip_adapter, image_encoder, backend, engine_options, **options),
                                device)  # fmt: skip

    # --- engines -------------------------------------------------------------------------------------------------
    def engine_defaults(self, base: str) -> dict[str, int]:
        """The build's shape options and their defaults (``height``, ``width``, ``batch``, ...)."""
        raise NotImplementedError

    def check_engine(self, base: str, class_name: str, adapters: list) -> None:
        """Refuse what this family's engines cannot run (a ``ConfigError`` saying what to use instead)."""

    def encoder_source(self, image_encoder: Any) -> str | None:
        """Where the loader finds the image encoder again (a module: the one it was loaded from); None: the base
        folder's own."""
        if isinstance(image_encoder, (str, os.PathLike)):
            return os.fspath(image_encoder)
        return getattr(getattr(image_encoder, "config", None), "name_or_path", None) or None

    def export(self, base: str, class_name: str, adapters: list, encoder: str | None, shapes: dict) -> Export:
        """The export contract at the build's shapes, with the adapter installed."""
        raise NotImplementedError

    def stand_in(self, engine: Any, config: Any, shapes: dict[str, list[int]], manifest: dict) -> EngineStandIn:
        """The module that takes the network's place in diffusers' pipeline and runs ``engine`` (``shapes``: each
        engine input's static shape)."""
        raise NotImplementedError

    def engine_components(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Components besides the stand-in that ``from_pretrained`` takes when opening an engine."""
        return {}

    def install_built(self, pipe: Any, manifest: dict[str, Any]) -> None:
        """Load the adapter(s) the engine was built with into an opened pipeline."""
        pipe.load_ip_adapter(manifest["adapters"])

    def build_engines(
        self, base: str | os.PathLike, ip_adapter: Any, image_encoder: Any, backend: str,
        engine_options: dict[str, Any] | None = None, out: str | os.PathLike | None = None,
        class_name: str | None = None, subfolder: Any = None, weight_name: Any = None,
    ) -> Path:  # fmt: skip
        """Build the heavy network's engine for ``base`` with ``ip_adapter`` (into ``out``, else the cache) or find it
        built; returns the folder. ``engine_options``: the shapes of :meth:`engine_defaults`, ``precision``
        (OpenVINO) and ``rebuild``."""
        from ..export import wrapped
        from ..export.manifest import FORMAT
        from ..export.writer import write_engines

        wrapped.check_backend(backend, self.title)
        if ip_adapter is None:
            raise ConfigError(f"{self.title} engines are built with their IP-Adapter(s): give ip_adapter")
        base = os.fspath(base)
        class_name = class_name or declared_pipeline(base) or self.pipelines[0]
        options = wrapped.shape_options(engine_options, self.engine_defaults(base), self.title, backend)
        adapters = adapter_sources(ip_adapter, subfolder, weight_name or self.default_weight)
        self.check_engine(base, class_name, adapters)
        encoder = self.encoder_source(image_encoder)
        sources = wrapped.source_records(base, self.base_parts, adapters, encoder)
        ident = wrapped.identity(self.kind, class_name, backend, options, sources, encoder)

        def build(folder: Path) -> None:
            exported = self.export(base, class_name, adapters, encoder, options["shapes"])
            record = {
                "format": FORMAT,
                "backend": backend,
                "precision": options["precision"],
                "kind": self.kind,
                "identity": ident,
                "sources": sources,
                "shapes": options["shapes"],
                "pipeline": class_name,
                "base": os.path.abspath(base) if os.path.isdir(base) else base,
                "adapters": [sources[f"ip_adapter_{i}"]["path"] for i in range(len(adapters))],
                "image_encoder": exported.image_encoder,
                **exported.record,
            }
            with exported.scope:  # the one engine writer of every build
                write_engines(folder, [exported.contract], record, ident, console.say)
            console.say(f"{exported.contract.name} engine written to '{folder}'")

        return wrapped.cached_build(ident, out, options["rebuild"], build)

    def open_engine(self, folder: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
        """The folder's pipeline class (this family's) whose heavy network runs the engine in ``folder``."""
        from diffusers.configuration_utils import FrozenDict

        from ..export import wrapped

        manifest, engine = wrapped.open_engine(folder, device, self.kind)
        base = manifest["base"]
        config = FrozenDict(read_json(base, f"{self.network}/config.json", {}))
        components = {self.network: self.stand_in(engine, config, wrapped.built_shapes(manifest), manifest)}
        with hushed(bars=True):
            components |= self.engine_components(manifest)
            cls = self.runtime_class(manifest["pipeline"])
            pipe = cls.from_pretrained(base, **components, dtype=torch.float32).to(device)
        self.install_built(pipe, manifest)
        return pipe


def default_size(base: str, sample_size: int) -> int:
    """diffusers' default image size for a folder: the network's sample size times the VAE's scale factor."""
    return sample_size * vae_scale_factor(base)


def vae_scale_factor(base: str) -> int:
    return 2 ** (len(read_json(base, "vae/config.json", {}).get("block_out_channels", [0] * 4)) - 1)


class FamilyMixin(GraphedNetworkMixin):
    """What every family's pipeline mixin shares: the heavy network (``_graph_network``) may be an engine stand-in
    (adapters built in, the size it was built for as the call's defaults); CUDA graphs of the network during the
    call; the runtime summary. A family adds its adapter loading and its image side."""

    _ipa_saved: dict | None = None  # what the network had before the adapter (once, across reloads)

    @property
    def on_engine(self) -> bool:
        """Whether the heavy network is an engine stand-in (its adapters are built in)."""
        return isinstance(getattr(self, self._graph_network, None), EngineStandIn)

    @property
    def adapter_count(self) -> int:
        raise NotImplementedError

    def _call_scope(self, kwargs: dict) -> contextlib.AbstractContextManager:
        """What a family sets up around diffusers' call (Kolors: its regional masks)."""
        return contextlib.nullcontext()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' call; on an engine, the size (and text length) it was built for are the defaults instead of
        diffusers' own."""
        defaults = getattr(getattr(self, self._graph_network), "call_defaults", {})
        kwargs |= {key: value for key, value in defaults.items() if kwargs.get(key) is None}
        with self._call_scope(kwargs), self.network_graphs():  # CUDA graphs of the network on CUDA
            return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def runtime_summary(self) -> str:
        """One line: what runs the heavy network, and the adapters."""
        net = getattr(self, self._graph_network)
        engine = getattr(net, "engine", None)
        where = (
            f"{type(engine.engine).__name__} engine" if engine is not None else f"PyTorch ({net.dtype}, {net.device})"
        )
        name = "UNet" if self._graph_network == "unet" else self._graph_network
        return f"{type(self).__name__}: {name} on {where}, {self.adapter_count} IP-Adapter(s)"


class SideMixin(FamilyMixin, ReferenceCacheMixin):
    """A transformer family whose adapter is an image side in a transformer attribute (``_side_attr``: Flux's
    ``encoder_hid_proj``, SD3's ``image_proj``) plus ipa_rt's processors on the blocks; image-encoder outputs cached by
    content."""

    _side_attr: ClassVar[str]
    _side_type: ClassVar[type]
    _block_processor: ClassVar[type]  # ipa_rt's attention processor of a block, made with the block's index

    def _installed_side(self) -> Any:
        side = getattr(self.transformer, self._side_attr, None)
        return side if isinstance(side, self._side_type) else None

    @property
    def image_side(self) -> Any:
        side = self._installed_side()
        if side is None:
            raise ConfigError("no ipa_rt IP-Adapter is loaded; call load_ip_adapter first")
        return side

    def _install_side(self, side: nn.Module) -> None:
        """Swap in ipa_rt's processors and the image side; remember what was there (once, across reloads). On
        an engine the branch is in its graph: the side only feeds it."""
        transformer = self.transformer
        self.reference_cache.clear()
        if self.on_engine:
            transformer.install_image_side(side)
            return
        if self._ipa_saved is None:
            self._ipa_saved = {
                "processors": dict(transformer.attn_processors),
                "side": getattr(transformer, self._side_attr, ABSENT),
            }
        elif self._installed_side() is not None:
            delattr(transformer, self._side_attr)  # its own attention would count as processors of the transformer
        processors = {name: self._block_processor(i) for i, name in enumerate(block_processors(transformer))}
        transformer.set_attn_processor(self._ipa_saved["processors"] | processors)
        param = next(transformer.parameters())
        setattr(transformer, self._side_attr, side.to(device=param.device, dtype=param.dtype))

    def _restore_side(self) -> None:
        """The transformer exactly as before the adapter (an engine: no image from now on)."""
        transformer = self.transformer
        if self.on_engine:
            transformer.install_image_side(None)  # the engine then adds exactly nothing
        if self._ipa_saved is not None:
            delattr(transformer, self._side_attr)
            if self._ipa_saved["side"] is not ABSENT:  # back first: its processors are among the saved ones
                setattr(transformer, self._side_attr, self._ipa_saved["side"])
            transformer.set_attn_processor(self._ipa_saved["processors"])
            self._ipa_saved = None
        self.reference_cache.clear()

    @staticmethod
    def _prepare_side(side: Any, embeds: Any) -> Any:
        """The side's per-call state for ``embeds`` (eager, memoised): what a captured transformer reads."""
        raise NotImplementedError

    def _image_to_stage(self, kwargs: dict) -> tuple[Any, Any] | None:
        side = self._installed_side()
        embeds = (kwargs.get("joint_attention_kwargs") or {}).get("ip_adapter_image_embeds")
        return (side.static, self._prepare_side(side, embeds)) if side is not None and embeds is not None else None

    @property
    def adapter_count(self) -> int:
        side = self._installed_side()
        return getattr(side, "num_ip_adapters", 1) if side is not None else 0


class MovableSide:
    """What Flux's and SD3's image sides share on a move (``.to()``): the float32 ``scale`` follows the module's
    device, its values and dtype untouched (diffusers' scales are Python floats), and what was prepared on the old
    device or dtype (``_memo``, ``static``) is dropped."""

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # type: ignore[misc]
        self.scale = self.scale.to(fn(self.scale).device)
        self._memo.clear()
        self.static.clear()
        return self


class EngineStandIn(ModelMixin):
    """What the engine stand-ins (Flux's and SD3's transformer, Kolors' UNet) share: a ``ModelMixin`` because
    diffusers' ``from_pretrained`` accepts no other kind of component in a network's place; float32 inputs whatever
    the engine computes in; the size it was built for as the pipeline's call defaults (``call_defaults``); and the
    adapters built in, installed once by the loader (:meth:`claim`)."""

    what = "engine"  # for messages: "a Flux engine", ...

    def __init__(self, engine: Any, config: Any, shapes: dict[str, list[int]], defaults: dict[str, int]) -> None:
        super().__init__()
        self.engine, self.config, self.shapes, self.call_defaults = engine, config, shapes, defaults
        self._installed = False

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.engine.device.type == "cpu" else self.engine.device

    def cache_context(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def claim(self, installing: bool) -> None:
        """The loader installs the adapters the engine was built with, once; any later install is refused (``None``,
        an unload, is always allowed: the engine then gets no image)."""
        if installing and self._installed:
            raise ConfigError(
                f"this pipeline runs {self.what} with its adapters built in; build engines for other adapters "
                "(from_pretrained(..., backend=...), or ipa_rt build) instead of load_ip_adapter"
            )
        self._installed = self._installed or installing

    @staticmethod
    def output(out: Tensor, return_dict: bool, kind: Callable[..., Any]) -> Any:
        return kind(sample=out) if return_dict else (out,)
