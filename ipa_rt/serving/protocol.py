"""The HTTP API's requests: JSON or multipart fields → one ``pipe.batch`` request, or a :class:`RequestError`
naming the field (no Ray here: the gateway calls it, and tests call it directly; the fields and their limits:
docs/guides/serving.md).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import RequestError
from .config import ModelSpec, ServeConfig

FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
FIELDS = ("model", "prompt", "negative_prompt", "image", "scale", "steps", "seed", "height", "width", "guidance",
          "format")  # fmt: skip
MAX_PROMPT = 2000  # characters
MAX_SEED = 2**63 - 1


@dataclass
class Job:
    """A validated request: which model, the ``pipe.batch`` arguments, the seed and output format."""

    model: str
    args: dict[str, Any]  # pipe(...) arguments plus ip_adapter_scale (the generator is made on the replica)
    seed: int
    format: str

    def signature(self) -> tuple:
        """What requests must share to run in one UNet batch."""
        a = self.args
        guidance = a["guidance_scale"]
        return a["num_inference_steps"], a["height"], a["width"], guidance is None or guidance > 1


def _integer(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(field, f"is {value!r}; expected an integer in [{lo}, {hi}]")
    return value


def _number(value: Any, field: str, lo: float, hi: float) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # text that is no number stays text: refused below, quoted
            value = float(value)
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or not lo <= value <= hi:
        raise RequestError(field, f"is {value!r}; expected a number in [{lo}, {hi}]")
    return float(value)


def decode_image(data: bytes | str, field: str, config: ServeConfig) -> Image.Image:
    """Bytes (multipart) or base64 (JSON, with or without a ``data:`` prefix) → an RGB image, within the limits."""
    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(field, "is not base64; expected a base64-encoded PNG/JPEG/WebP image") from None
    if len(data) > config.max_upload_bytes:
        raise RequestError(field, f"is {len(data)} bytes; expected at most {config.max_upload_bytes}", status=413)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > config.max_image_pixels:
                raise RequestError(
                    field, f"is {im.width}x{im.height} pixels; expected at most {config.max_image_pixels}", status=413
                )
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise RequestError(field, "cannot be decoded as an image; expected PNG, JPEG or WebP") from None


def _scale(value: Any, names: list[str], config: ServeConfig) -> float | list[float]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError("scale", f"is {value!r}; expected a number, a list or an object") from None
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise RequestError("scale", f"names unknown adapter(s) {unknown}; this model serves {names}")
        return [_number(value.get(n, 1.0), f"scale.{n}", 0.0, config.max_scale) for n in names]
    if isinstance(value, list):
        if len(value) != len(names):
            raise RequestError("scale", f"has {len(value)} values; expected {len(names)} (one per adapter {names})")
        return [_number(v, f"scale[{i}]", 0.0, config.max_scale) for i, v in enumerate(value)]
    return _number(value, "scale", 0.0, config.max_scale)


def parse(fields: dict[str, Any], images: list[bytes | str], config: ServeConfig) -> Job:
    """One request's fields (``images``: multipart files, or the JSON ``image`` values) → a :class:`Job`."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"is not a field of this API; expected some of {list(FIELDS)}", status=400)
    model = fields.get("model", next(iter(config.models)) if len(config.models) == 1 else None)
    if model not in config.models:
        raise RequestError("model", f"is {model!r}; this server has {sorted(config.models)}", status=404)
    spec: ModelSpec = config.models[model]
    names = spec.adapter_names()
    prompt, negative = fields.get("prompt", ""), fields.get("negative_prompt")
    for field, text in (("prompt", prompt), ("negative_prompt", negative)):
        if text is not None and (not isinstance(text, str) or len(text) > MAX_PROMPT):
            raise RequestError(field, f"expected a string of at most {MAX_PROMPT} characters")
    if images and len(images) not in (1, len(names)):
        raise RequestError("image", f"has {len(images)} images; expected none, one, or one per adapter {names}")
    refs = [decode_image(data, f"image[{i}]", config) for i, data in enumerate(images)]
    fmt = fields.get("format", "png")
    if fmt not in FORMATS:
        raise RequestError("format", f"is {fmt!r}; expected one of {sorted(FORMATS)}")
    size = {}
    for field in ("height", "width"):
        if fields.get(field) is not None:
            size[field] = _integer(fields[field], field, 8, config.max_size)
            if size[field] % 8:
                raise RequestError(field, f"is {size[field]}; expected a multiple of 8")
    guidance = spec.default_guidance
    if fields.get("guidance") is not None:
        guidance = _number(fields["guidance"], "guidance", 0.0, 30.0)
    args: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative,
        "num_inference_steps": _integer(fields.get("steps", spec.default_steps), "steps", 1, config.max_steps),
        "guidance_scale": guidance,
        "height": size.get("height"),
        "width": size.get("width"),
        "output_type": "pil",
    }
    if refs:
        args["ip_adapter_image"] = refs * len(names) if len(refs) == 1 else refs
        args["ip_adapter_scale"] = _scale(fields.get("scale", 1.0), names, config)
    elif fields.get("scale") is not None:
        _scale(fields["scale"], names, config)  # still checked: a bad field is an error, image or not
    seed = _integer(fields.get("seed", 0), "seed", 0, MAX_SEED)
    return Job(model, args, seed, fmt)


def parse_json(body: bytes, config: ServeConfig) -> Job:
    if len(body) > config.max_upload_bytes * 2:  # base64 of the largest images allowed, and the rest
        raise RequestError("body", f"is {len(body)} bytes; expected at most {config.max_upload_bytes * 2}", status=413)
    try:
        fields = json.loads(body)
    except ValueError:
        raise RequestError("body", "is not JSON; expected a JSON object (or multipart/form-data)", status=400) from None
    if not isinstance(fields, dict):
        raise RequestError("body", f"is a JSON {type(fields).__name__}; expected an object", status=400)
    images = fields.pop("image", None)
    images = [] if images is None else (images if isinstance(images, list) else [images])
    if not all(isinstance(i, str) for i in images):
        raise RequestError("image", "expected base64 strings (one per adapter)")
    return parse(fields, images, config)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return buf.getvalue()
