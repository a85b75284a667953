"""The reference cache (encoder outputs, image tokens, image keys/values per reference) and the text cache: what they
skip, that results are bitwise those of a call with empty caches, their bounds, and what drops them."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CALL,
    FAMILY_CASES,
    SIZE,
    assert_parity,
    count_forwards,
    diffusers_pipe,
    fixed_latents,
    ipa_pipe,
)

import ipa_rt
from ipa_rt.runtime.lru import REFERENCE_CACHE_ENV, LRUCache, reference_cache_bytes


def call(pipe, image, prompt: str = "a cat", **kw) -> torch.Tensor:
    return pipe(prompt, ip_adapter_image=image, latents=fixed_latents(), **CALL, **kw).images


def fresh(pipe, image, **kw) -> torch.Tensor:
    """The call made with empty caches: everything encoded, projected and computed anew."""
    pipe.clear_caches()
    return call(pipe, image, **kw)


def image_side_hits(pipe) -> int:
    return pipe.cache_stats()["reference"]["by_kind"].get("image_side", {}).get("hits", 0)


def test_a_b_a_copies_the_cached_reference_and_equals_fresh_calls(models, images):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    expected = {i: fresh(pipe, images[i]) for i in (0, 1)}
    pipe.clear_caches()
    counts = count_forwards(
        encoder=pipe.image_encoder, projection=pipe.adapters.projections[0], to_k_ip=pipe.adapters.to_k_ip[0][0]
    )
    for step, i in enumerate((0, 1, 0)):
        assert torch.equal(call(pipe, images[i]), expected[i]), f"call {step} (image {i})"
    # a base adapter encodes one image with one forward (its unconditional side is zeros): A and B once, A again never
    assert counts == {"encoder": 2, "projection": 2, "to_k_ip": 2}
    assert image_side_hits(pipe) == 1
    # a regional mask reuses the reference's keys/values (masks do not enter them): same as a fresh masked call
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1.0
    masked = {"cross_attention_kwargs": {"ip_adapter_masks": [mask]}}
    out = call(pipe, images[0], **masked)
    assert counts["to_k_ip"] == 2 and image_side_hits(pipe) == 2
    assert torch.equal(out, fresh(pipe, images[0], **masked))


@pytest.mark.slow
def test_scale_change_keeps_the_cache_and_matches_diffusers(models, images):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"))
    call(pipe, images[0])
    call(pipe, images[1])
    counts = count_forwards(encoder=pipe.image_encoder, to_k_ip=pipe.adapters.to_k_ip[0][0])
    pipe.set_ip_adapter_scale(0.5)  # keys/values are pre-scale: the cached reference stays valid
    ours = call(pipe, images[0])
    assert counts == {"encoder": 0, "to_k_ip": 0} and image_side_hits(pipe) == 1
    ref = diffusers_pipe(models, "sd15", ["plus.safetensors"])
    ref.set_ip_adapter_scale(0.5)
    assert_parity(ours, ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images)


@pytest.mark.slow
def test_load_ip_adapter_drops_the_cache_and_equals_a_fresh_pipeline(models, images):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    before = call(pipe, images[0])
    with pytest.raises(ipa_rt.CheckpointError, match=r"missing\.safetensors"):  # a failed load changes nothing
        pipe.load_ip_adapter(models.adapter_dir("sd15"), subfolder="", weight_name="missing.safetensors")
    assert torch.equal(fresh(pipe, images[0]), before)
    encoder = pipe.image_encoder
    pipe.load_ip_adapter(models.adapter_dir("sd15"), subfolder="", weight_name="plus-s7.safetensors")
    assert len(pipe.reference_cache) == 0 and pipe.image_encoder is encoder  # it fits: kept, as diffusers keeps it
    counts = count_forwards(encoder=encoder)
    out = call(pipe, images[0])
    assert counts["encoder"] == 2  # the cache was dropped (a Plus adapter also encodes zero pixels)
    other = ipa_pipe(models, "sd15", models.adapter("sd15", "plus", seed=7))
    assert torch.equal(out, call(other, images[0]))
    pipe.unload_ip_adapter()
    assert len(pipe.reference_cache) == 0 and len(pipe.text_cache) == 0
    pipe.backend = "onnxruntime"  # what an engine pipeline reports
    with pytest.raises(ipa_rt.ConfigError, match="onnxruntime engines, which are built for their IP-Adapters"):
        pipe.load_ip_adapter(models.adapter_dir("sd15"), subfolder="", weight_name="base.safetensors")


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_text_cache_skips_the_text_encoders(models, images, family):
    pipe = ipa_pipe(models, family, models.adapter(family, "base"))
    counts = count_forwards(**{f"text_{i}": e for i, e in enumerate(pipe.text_encoders)})
    first = call(pipe, images[0], negative_prompt="blurry")
    seen = dict(counts)
    assert all(n > 0 for n in seen.values())
    (cached,) = [v for v, _ in pipe.text_cache._entries.values()]
    kept = cached.embeds.clone()
    again = call(pipe, images[0], negative_prompt="blurry")
    assert counts == seen and torch.equal(again, first) and torch.equal(cached.embeds, kept)  # read, never written
    assert pipe.cache_stats()["text"]["hits"] == 1
    call(pipe, images[0], negative_prompt="dark")  # another negative prompt is another entry
    assert counts != seen and len(pipe.text_cache) == 2
    assert torch.equal(fresh(pipe, images[0], negative_prompt="blurry"), first)
    pipe.to("cpu")
    assert len(pipe.text_cache) == 0 and len(pipe.reference_cache) == 0


@pytest.mark.slow
def test_the_byte_bound_evicts_least_recently_used(models, images, monkeypatch):
    monkeypatch.setenv(REFERENCE_CACHE_ENV, "0.25")
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    cache = pipe.reference_cache
    assert cache.max_bytes == 2**18
    expected = [fresh(pipe, im) for im in images]
    pipe.clear_caches()
    call(pipe, images[0])
    cache.max_bytes = cache.bytes * 3 // 2  # room for one reference, not two
    for i in (1, 2, 0, 1):
        assert torch.equal(call(pipe, images[i]), expected[i])
        stats = pipe.cache_stats()["reference"]
        assert 0 < stats["bytes"] <= stats["max_bytes"]
        assert pipe.memory_stats()["reference_cache_bytes"] == stats["bytes"]
    assert stats["evictions"] >= 4 and image_side_hits(pipe) == 0
    cache.max_bytes = 0  # nothing kept (what was is dropped at once); results unchanged
    assert len(cache) == 0
    assert torch.equal(call(pipe, images[2]), expected[2]) and len(cache) == 0


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_bad_reference_cache_bound_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv(REFERENCE_CACHE_ENV, value)
    expected = rf"{REFERENCE_CACHE_ENV} is '{value}'; expected a number of megabytes >= 0"
    with pytest.raises(ipa_rt.ConfigError, match=expected):
        reference_cache_bytes()


def test_bad_bound_fails_at_load(models, monkeypatch):
    monkeypatch.setenv(REFERENCE_CACHE_ENV, "512MB")
    with pytest.raises(ipa_rt.ConfigError, match=REFERENCE_CACHE_ENV):
        ipa_pipe(models, "sd15", models.adapter("sd15", "base"))


def test_lru_cache_bounds_binding_and_stats():
    t = lambda n: torch.zeros(n, dtype=torch.uint8)  # noqa: E731
    cache = LRUCache("test", max_bytes=100, max_entries=3)
    owner = object()
    cache.bind(owner)
    cache.put(("a", 1), t(40))
    cache.put(("a", 2), (t(40), t(10)))
    assert cache.get(("a", 1)) is not None  # now the most recently used
    cache.put(("b", 3), t(30))  # 120 bytes > 100: ("a", 2) goes
    assert ("a", 2) not in cache and cache.bytes == 70 and cache.evictions == 1
    cache.put(("b", 4), t(101))  # larger than the whole bound: not kept, nothing evicted
    assert ("b", 4) not in cache and cache.bytes == 70
    view = t(60)
    cache.put(("c", 5), [view[:30], view[30:]])  # one storage, counted once: 130 bytes, ("a", 1) goes
    assert cache.bytes == 90 and len(cache) == cache.stats()["entries"] == 2
    cache.bind(owner)  # the same modules: entries stay
    assert len(cache) == 2
    cache.max_bytes = 50  # a smaller bound applies at once
    assert cache.bytes == 0 and ("c", 5) not in cache
    cache.max_bytes = 100
    cache.put(("c", 6), t(10))
    cache.bind(object())  # entries made by other modules are never served
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.get(("a", 1)) is None
    stats = cache.stats()
    assert stats["by_kind"]["a"] == {"hits": 1, "misses": 1} and stats["hits"] == 1
