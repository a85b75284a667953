"""The Ray Serve application behind ``ipa_rt serve``: :class:`Gateway` (FastAPI ingress, behind
:class:`~.auth.RequireKey`) and :class:`ModelServer` (one deployment per model, one pipeline per replica).

Requests ``serve.batch`` gathers run as one ``pipe.batch`` call per signature (steps, size, guidance on/off); a
request the pipeline refuses is answered alone, so one bad request never fails its batch mates, and the work runs in
a thread, so the replica keeps accepting requests and answering health checks meanwhile (docs/guides/serving.md: the
API, its errors, retries and limits).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from ..errors import IpaRtError, RequestError
from . import protocol
from .auth import ApiKey, RequireKey
from .config import ModelSpec, ServeConfig

GATEWAY_ONGOING = 1024  # requests a gateway replica holds (each an await on a model deployment)
FORM_FILES, FORM_FIELDS = 16, 32  # parts of a multipart body (starlette's parser refuses more)
DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ReplicaUnavailableError)
api = FastAPI(title="ipa_rt", description="IP-Adapter image generation (ipa_rt on Ray Serve)")


def error(status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def load_pipeline(spec: ModelSpec):
    """The replica's pipeline: ``Pipeline.from_pretrained`` with the spec's files and options."""
    from ..adapters.checkpoint import AdapterSource
    from ..export.build import DTYPES
    from ..pipeline import Pipeline

    sources = []
    for ref in spec.ip_adapter:  # "repo::subfolder/file.safetensors": a hub adapter; anything else: a file
        repo, hub, path = ref.partition("::")
        sub, _, name = path.rpartition("/")
        sources.append(AdapterSource(repo, weight_name=name, subfolder=sub or None) if hub else ref)
    kwargs: dict[str, Any] = dict(dtype=DTYPES[spec.dtype], device=spec.device, scheduler=spec.scheduler)
    kwargs |= {k: v for k, v in (("config", spec.config), ("tokenizer", spec.tokenizer), ("vae", spec.vae)) if v}
    if spec.backend != "torch":
        kwargs.update(backend=spec.backend, engine_options=spec.engine_options)
    pipe = Pipeline.from_pretrained(spec.base, sources, spec.image_encoder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ModelServer:
    """One replica of one model's deployment."""

    def __init__(self, spec: dict[str, Any], max_batch_size: int, batch_wait_timeout_s: float, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.spec = ModelSpec(**spec)
        self.pipe = load_pipeline(self.spec)
        self.fault: str | None = None  # a device fault: the health check then fails and Ray replaces the replica
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def check_health(self) -> None:
        if self.fault is not None:
            raise RuntimeError(f"replica unhealthy: {self.fault}")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[protocol.Job]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._run, jobs)

    def _run(self, jobs: list[protocol.Job]) -> list[dict[str, Any]]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.signature()].append(i)
        out: list[dict[str, Any]] = [{}] * len(jobs)
        for members in groups.values():
            try:
                results = self._batch([jobs[i] for i in members])
            except IpaRtError:  # someone's request is one the pipeline refuses: answer each alone
                results = [self._alone(jobs[i]) for i in members]
            for i, result in zip(members, results, strict=True):
                out[i] = result
        return out

    def _batch(self, jobs: list[protocol.Job]) -> list[dict[str, Any]]:
        requests = [dict(job.args, generator=torch.Generator().manual_seed(job.seed)) for job in jobs]
        try:
            outputs = self.pipe.batch(requests)
        except torch.cuda.OutOfMemoryError as exc:  # the device is still sound: refuse this batch, stay healthy
            return [{"status": 503, "error": f"out of device memory ({exc})"} for _ in jobs]
        except torch.AcceleratorError as exc:  # a sticky device fault: fail the health check so Ray replaces us
            self.fault = str(exc)[:300]
            raise
        return [
            {"status": 200, "image": protocol.encode(o.images[0], job.format), "batch": len(jobs)}
            for job, o in zip(jobs, outputs, strict=True)
        ]

    def _alone(self, job: protocol.Job) -> dict[str, Any]:
        try:
            return self._batch([job])[0]
        except IpaRtError as exc:
            return {"status": 422, "error": str(exc)}


class Gateway:
    """HTTP front: validation, routing to the model deployments, backpressure and replica-death handling."""

    def __init__(self, config: dict[str, Any], models: dict[str, Any]):
        self.config = ServeConfig.from_dict(config)
        self.models = models  # model name -> DeploymentHandle

    async def _call(self, job: protocol.Job) -> dict[str, Any] | JSONResponse:
        retry = {"Retry-After": str(self.config.retry_after_s)}
        for attempt in range(2):  # a replica that dies mid-request: once more, on a live replica
            response = self.models[job.model].generate.remote(job)
            try:
                return await asyncio.wait_for(response, timeout=self.config.request_timeout_s)
            except BackPressureError:
                return error(503, "model", f"model {job.model!r} is at capacity; retry later", retry)
            except DeploymentUnavailableError:
                return error(503, "model", f"model {job.model!r} is not available yet; retry later", retry)
            except TimeoutError:
                response.cancel()
                return error(504, "model", f"no answer within {self.config.request_timeout_s} s")
            except DIED as exc:
                if attempt:
                    return error(503, "model", f"the replica died twice ({type(exc).__name__}); retry later", retry)
        raise AssertionError("unreachable")

    async def _job(self, request: Request) -> protocol.Job:
        length = int(request.headers.get("content-length") or 0)
        limit = self.config.max_upload_bytes * 2
        if length > limit:
            raise RequestError("body", f"is {length} bytes; expected at most {limit}", status=413)
        if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form")):
            try:
                form = await request.form(max_files=FORM_FILES, max_fields=FORM_FIELDS)
            except (HTTPException, MultiPartException) as exc:  # too many parts, a part too large, a broken body
                detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
                limits = f"at most {FORM_FILES} files and {FORM_FIELDS} fields"
                raise RequestError("body", f"{detail} ({limits})", status=400) from None
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            images = [await f.read() for k, f in form.multi_items() if not isinstance(f, str) and k == "image"]
            others = [k for k, f in form.multi_items() if not isinstance(f, str) and k != "image"]
            if others:
                raise RequestError(others[0], "is a file; only 'image' takes files", status=400)
            return protocol.parse(fields, images, self.config)
        return protocol.parse_json(await request.body(), self.config)

    async def generate(self, request: Request) -> Response:
        try:
            job = await self._job(request)
            result = await self._call(job)
        except RequestError as exc:
            return error(exc.status, exc.field, exc.message)
        except Exception as exc:  # never a bare 500 page: a JSON error the client can read
            return error(500, "request", f"{type(exc).__name__}: {exc}"[:500])
        if isinstance(result, Response):
            return result
        if result["status"] != 200:
            return error(result["status"], "request", result["error"])
        headers = {"X-Batch-Size": str(result["batch"])}
        return Response(result["image"], media_type=protocol.FORMATS[job.format], headers=headers)

    async def models_info(self) -> dict[str, Any]:
        return {
            name: {"adapters": spec.adapter_names(), "default_steps": spec.default_steps, "backend": spec.backend}
            for name, spec in self.config.models.items()
        }

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


def gateway_key() -> ApiKey | None:
    """The key of the gateway replica serving this request (the replica object Serve also hands the routes)."""
    return serve.get_replica_context().servable_object.config.api_key


# FastAPI routes on the ingress class (serve.ingress wires the app's routes to the replica's methods); the key check
# is middleware, added before serve.ingress copies the app, so it wraps every route, FastAPI's /docs and the 404s
api.post("/v1/generate")(Gateway.generate)
api.get("/v1/models")(Gateway.models_info)
api.get("/healthz")(Gateway.healthz)
api.add_middleware(RequireKey, key=gateway_key)
GatewayDeployment = serve.ingress(api)(Gateway)


def build_app(config: ServeConfig):
    """The Serve application: one ModelServer deployment per model, the gateway in front."""
    config.check()
    actor = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}  # num_gpus=1: a GPU of its own per replica
    scaling = (
        {"autoscaling_config": config.autoscaling} if config.autoscaling else {"num_replicas": config.num_replicas}
    )
    handles = {}
    for name, spec in config.models.items():
        deployment = serve.deployment(
            ModelServer,
            name=f"model-{name}",
            ray_actor_options=actor,
            max_ongoing_requests=config.max_ongoing_requests,
            max_queued_requests=config.max_queued_requests,
            health_check_period_s=config.health_check_period_s,
            graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
            **scaling,
        )
        handles[name] = deployment.bind(
            dataclasses.asdict(spec), config.max_batch_size, config.batch_wait_timeout_s, config.threads
        )
    gateway = serve.deployment(  # it only awaits: many requests at once, so the model queues are the bound that bites
        GatewayDeployment,
        name="gateway",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=GATEWAY_ONGOING,
        max_queued_requests=GATEWAY_ONGOING,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
    )
    return gateway.bind(dataclasses.asdict(config), handles)
