"""The conditioning cache: safetensors shards read lazily, resumed shard by shard."""

from __future__ import annotations

import torch

import slimdit.data.cache as cache
from slimdit.data.cache import Rows, cached_conditioning, in_memory
from slimdit.data.datasets import load_dataset
from slimdit.pipelines.loading import load_pipeline


def test_sharded_cache_reads_the_rows_it_is_asked_for_and_resumes_by_shard(tiny_teacher, tmp_path, monkeypatch):
    pipe = load_pipeline(tiny_teacher, "cpu")
    data = load_dataset("shapes-train:8")
    whole = in_memory(cached_conditioning(pipe, tiny_teacher, data, tmp_path / "one", 16))  # one shard of 8

    monkeypatch.setattr(cache, "SHARD", 3)  # shards of 3, 3 and 2 samples
    calls = []
    real = cache.encode_captions
    monkeypatch.setattr(cache, "encode_captions", lambda p, c, n: calls.append(len(c)) or real(p, c, n))
    c = cached_conditioning(pipe, tiny_teacher, data, tmp_path / "three", 16)
    entry = next((tmp_path / "three").iterdir())
    assert sorted(f.name for f in entry.glob("shard_*")) == [f"shard_0000{i}.safetensors" for i in range(3)]
    assert isinstance(c.latents, Rows) and len(c) == 8 and c.latents.shape == whole.latents.shape
    assert calls == [3, 3, 2, 1]  # three shards, then the empty caption
    loaded = in_memory(c)  # every shard read whole
    idx = torch.tensor([7, 0, 4, 4, 2])  # across shards, repeated, out of order
    assert torch.equal(c.latents[idx], loaded.latents[idx])
    drop = torch.tensor([False, True, False, False, True])
    for k, v in c.take(idx, drop).items():
        assert torch.equal(v, loaded.take(idx, drop)[k]), k
    assert torch.equal(c.cond["prompt_embeds"][2:5], loaded.cond["prompt_embeds"][2:5])
    # encoded in batches of 3 instead of 8: the same values, up to convolutions' batch-dependent rounding (on two
    # threads the latents differ by up to 2e-4, on one by nothing)
    assert torch.allclose(loaded.latents, whole.latents, atol=1e-3)
    assert torch.allclose(loaded.cond["prompt_embeds"], whole.cond["prompt_embeds"], atol=1e-5)

    # an interrupted caching (shard 1 and the final meta.json missing) redoes only what is missing
    (entry / "shard_00001.safetensors").unlink()
    (entry / "meta.json").unlink()
    calls.clear()
    again = in_memory(cached_conditioning(pipe, tiny_teacher, data, tmp_path / "three", 16))
    assert calls == [3, 1]
    assert torch.equal(again.latents, loaded.latents)
