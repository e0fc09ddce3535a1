"""The binding probe: token labels from a rendered scene, the joint-attention recorder on a real tiny Flux, and
the whole probe end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimdit.worlds.shapes.binding import PAIRS, joint_attention_recorded, probe_binding, token_labels
from slimdit.worlds.shapes.scenes import PlacedObject, render


def test_token_labels_find_each_objects_colour_in_its_patches():
    image = render([PlacedObject("square", "green", "big", 8, 8), PlacedObject("circle", "red", "big", 24, 24)])
    lab = token_labels(image, 8, ("green", "red")).reshape(8, 8)
    assert lab[1, 1] == 0 and lab[6, 6] == 1  # each object's centre patch has its colour
    assert lab[1, 6] == -1 and lab[6, 1] == -1  # empty corners have neither
    assert (lab == 0).sum() > 2 and (lab == 1).sum() > 2


def test_the_recorder_keeps_image_to_text_attention_per_block_and_restores_diffusers(tiny_flux_pipeline):
    import diffusers.models.transformers.transformer_flux as flux

    from slimdit.pipelines.loading import load_pipeline, pipeline_sampler

    original = flux.dispatch_attention_fn
    pipe = load_pipeline(str(tiny_flux_pipeline), "cpu")
    with joint_attention_recorded(pipe.transformer) as records:
        pipeline_sampler(pipe, str(tiny_flux_pipeline), steps=2).generate(["a red circle"], [0], progress=False)
    assert flux.dispatch_attention_fn is original
    assert len(records) == 2 and all(len(r) == 3 for r in records)  # 2 passes (guidance-embedded) x 3 blocks
    a = records[0][0].attention
    assert a.shape == (1, 64, 16)  # batch, image tokens (32 px -> 16 latent -> 8 x 8 packed), text tokens
    assert torch.all(a >= 0) and torch.all(a.sum(-1) <= 1 + 1e-5)  # a part of each query's distribution
    # the peak logit of a normalised query and key never passes sqrt(d) times the norms' largest weights
    t = pipe.transformer
    norms = [(b.attn.norm_q, b.attn.norm_added_k) for b in t.transformer_blocks] + \
            [(b.attn.norm_q, b.attn.norm_k) for b in t.single_transformer_blocks]
    d = t.config.attention_head_dim
    for rec in records:
        for r, (nq, nk) in zip(rec, norms):
            assert r.peak.shape == (1, 64)
            assert torch.all(r.peak <= d ** 0.5 * nq.weight.abs().max() * nk.weight.abs().max() + 1e-4)


def test_the_probe_runs_end_to_end_and_refuses_a_pipeline_without_joint_attention(tiny_flux_pipeline, tiny_teacher):
    r = probe_binding(str(tiny_flux_pipeline), seeds=1, steps=2)
    assert r.blocks == ["double.0", "single.0", "single.1"] and r.images == len(PAIRS)
    assert len(r.right) == len(r.wrong) == len(r.peak_logit) == 3 and np.all(np.isfinite(r.right + r.wrong))
    assert np.all(np.isfinite(r.peak_logit)) and "peak logit" in r.table()
    assert len(r.per_image) == len(PAIRS) and "block" in r.table()
    with pytest.raises(ValueError, match="reads Flux's joint attention"):
        probe_binding(tiny_teacher, seeds=1, steps=2)
