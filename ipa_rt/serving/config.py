"""What ``ipa_rt serve`` serves: one :class:`ServeConfig` (JSON file or CLI flags), one :class:`ModelSpec` per model
(docs/guides/serving.md: a ``serve.json``, every option, and where ``api_key`` stands among the key's sources).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .auth import ApiKey

DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class ModelSpec:
    """One served model: what ``Pipeline.from_pretrained`` loads on every replica of its deployment.

    ``ip_adapter``: files, or ``repo::subfolder/weight_name`` hub references; each adapter is named by its file
    stem in requests (``scale: {"ip-adapter_sd15": 0.6}``). ``base`` may be a single-file checkpoint; ``config`` (a
    diffusers folder with its configs) and ``tokenizer`` (a CLIP tokenizer folder) then load it offline, as
    ``from_pretrained``'s arguments of those names do; ``vae``: another autoencoder (folder, hub id or ``"taesd"``)."""

    base: str
    ip_adapter: list[str] = field(default_factory=list)
    image_encoder: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"  # "cuda": the replica's own GPU (Ray sets CUDA_VISIBLE_DEVICES per replica)
    backend: str = "torch"
    scheduler: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    default_steps: int = 30
    default_guidance: float | None = None  # None: the family's diffusers default
    config: str | None = None
    tokenizer: str | None = None
    vae: str | None = None

    def adapter_names(self) -> list[str]:
        return [Path(a.split("::")[-1]).stem for a in self.ip_adapter]

    def check(self, name: str) -> None:
        if not self.ip_adapter:
            raise ConfigError(f"model {name!r} has no ip_adapter; expected at least one adapter file")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model {name!r} has dtype {self.dtype!r}; expected one of {DTYPES}")
        names = self.adapter_names()
        if len(set(names)) != len(names):
            raise ConfigError(f"model {name!r} has adapters with the same file name {names}; expected distinct names")
        if not isinstance(self.default_steps, int) or self.default_steps < 1:
            raise ConfigError(f"model {name!r} has default_steps {self.default_steps!r}; expected a positive integer")


@dataclass
class ServeConfig:
    """Serving options. Per model deployment: ``num_replicas`` (or ``autoscaling``: Ray Serve's
    ``autoscaling_config``), ``num_gpus`` / ``num_cpus`` per replica (``ray_actor_options``: one pipeline per
    replica, each on its own accelerator when ``num_gpus=1``), ``max_batch_size`` / ``batch_wait_timeout_s``
    (``serve.batch``), ``max_queued_requests`` (excess gets 503 with ``Retry-After``), ``max_ongoing_requests``.
    Limits on requests: upload bytes, image pixels, steps, size, scale. ``api_key``: the key every request but
    ``/healthz`` must bring (a string is turned into an :class:`~.auth.ApiKey`, which holds only a digest of it)."""

    models: dict[str, ModelSpec]
    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    threads: int | None = None  # torch threads per replica (default: its CPUs)
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    retry_after_s: int = 2
    request_timeout_s: float = 300.0
    health_check_period_s: float = 10.0
    graceful_shutdown_timeout_s: float = 30.0
    max_upload_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096
    max_steps: int = 100
    max_size: int = 2048
    max_scale: float = 2.0
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: ApiKey | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not isinstance(self.api_key, ApiKey):
            self.api_key = ApiKey(self.api_key)  # from here on only a digest: reprs and pickles carry no key

    def check(self) -> None:
        if not self.models:
            raise ConfigError("the serve config has no models; expected {'models': {name: {'base': ...}}}")
        for name, spec in self.models.items():
            spec.check(name)
        for key in ("num_replicas", "max_batch_size", "max_ongoing_requests", "max_queued_requests", "max_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} is {value!r}; expected a positive integer")
        cuda = [n for n, spec in self.models.items() if spec.device.startswith("cuda")]
        if cuda and self.num_gpus <= 0:
            raise ConfigError(f"model(s) {cuda} run on CUDA but num_gpus is {self.num_gpus}; expected 1 per replica")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size ({self.max_batch_size}): "
                "a replica could never form a full batch; raise it"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> ServeConfig:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ConfigError(f"{where} must be a JSON object with a 'models' object; got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where} has unknown option(s) {unknown}; expected some of {sorted(known)}")
        model_keys = {f.name for f in fields(ModelSpec)}
        models = {}
        for name, spec in data["models"].items():
            bad = sorted(set(spec) - model_keys) if isinstance(spec, dict) else ["<not an object>"]
            if bad or "base" not in spec:
                raise ConfigError(
                    f"{where}: model {name!r} has unknown key(s) {bad} or no 'base'; expected keys among "
                    f"{sorted(model_keys)}"
                )
            spec = dict(spec)
            if isinstance(spec.get("ip_adapter"), str):
                spec["ip_adapter"] = [spec["ip_adapter"]]
            models[name] = ModelSpec(**spec)
        if data.get("api_key") is not None and not isinstance(data["api_key"], ApiKey):
            data = {**data, "api_key": ApiKey(data["api_key"], where=f"{where}: api_key")}
        config = cls(**{**data, "models": models})
        config.check()
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ServeConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"serve config '{path}' cannot be read as JSON ({exc})") from None
        return cls.from_dict(data, where=f"serve config '{path}'")


def example_config(root: str | os.PathLike, **options: Any) -> ServeConfig:
    """The offline example: a tiny random SD1.5 model and adapter written in the real formats (``ipa_rt.testing``)."""
    from ..testing import write_example

    files = write_example(root)
    spec = ModelSpec(base=str(files["base"]), ip_adapter=[str(files["adapter"])], default_steps=4)
    config = ServeConfig(models={"example": spec}, **options)
    config.check()
    return config
