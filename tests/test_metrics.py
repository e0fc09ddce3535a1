"""CMMD, FID and CLIP score, and the CLIP embedder on a tiny random CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimdit.metrics.clip_score import clip_score
from slimdit.metrics.cmmd import cmmd
from slimdit.metrics.fid import fid, frechet_distance


def _brute_cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = 10.0) -> float:
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    y = torch.nn.functional.normalize(y.double(), dim=-1)

    def k(a, b):
        return float(np.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2)))

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return 1000 * (kxx + kyy - 2 * kxy)


def test_cmmd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    shifts = [cmmd(x, x + s * torch.ones(16)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(shifts, shifts[1:])) and shifts[0] > 0


def test_cmmd_equals_a_brute_force_double_loop():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 8, generator=g), torch.randn(17, 8, generator=g) + 0.3
    assert cmmd(x, y) == pytest.approx(_brute_cmmd(x, y), rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))  # a rotated covariance against the identity
    s2 = q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, np.eye(5), mu1, s2) == pytest.approx(((1 - np.sqrt(b)) ** 2).sum(), rel=1e-8)


def test_fid_of_samples_is_near_zero_for_one_distribution_and_not_for_two():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    assert fid(x, y) < 0.05 < fid(x, y + 1.0)


def test_clip_score_is_100_cosine_clamped():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert clip_score(v, t) == pytest.approx(100 / 3)


def tiny_clip_dir(tmp_path):
    """A tiny random CLIP (model, shapes tokenizer, image processor) saved in ``tmp_path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from slimdit.worlds.shapes.text import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=48, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(tmp_path)
    return tmp_path


def test_clip_embedder_from_a_local_directory(tmp_path):
    from slimdit.metrics.embedders import get_embedder
    from slimdit.worlds.shapes.prompts import eval_prompts, render_prompt

    tiny_clip_dir(tmp_path)
    emb = get_embedder(f"clip:{tmp_path}")
    prompts = eval_prompts()[:8]
    imgs = np.stack([render_prompt(p, np.random.default_rng(i)) for i, p in enumerate(prompts)])
    e = emb.embed_images(imgs)
    assert e.shape == (8, 16) and torch.isfinite(e).all()
    assert cmmd(e, e) == pytest.approx(0.0, abs=1e-9)
    assert 0 <= clip_score(e, emb.embed_texts([p.text for p in prompts])) <= 100


def test_unknown_embedder_is_named():
    from slimdit.metrics.embedders import get_embedder

    with pytest.raises(ValueError, match="unknown embedder 'inception'"):
        get_embedder("inception")


def test_shipped_shapes_embedder_separates_good_from_degraded_images():
    from scipy import ndimage

    from slimdit.metrics.benchmarks import image_seeds
    from slimdit.worlds.shapes.benchmark import reference_images, select_prompts
    from slimdit.worlds.shapes.embedder import load_shapes_embedder
    from slimdit.worlds.shapes.oracle import OracleSampler

    emb = load_shapes_embedder()
    ps = select_prompts(60)
    per = [p for p in ps for _ in range(4)]
    ref = emb.embed_images(reference_images(tuple(ps), 600))
    imgs = OracleSampler().generate([p.text for p in per], image_seeds(len(ps), 4, 0))
    blurred = ndimage.gaussian_filter(imgs.astype(float), (0, 1, 1, 0)).astype(np.uint8)
    good, bad = emb.embed_images(imgs), emb.embed_images(blurred)
    assert cmmd(good, ref) < cmmd(bad, ref) and fid(good, ref) < fid(bad, ref)
    texts = emb.embed_texts([p.text for p in per])
    shuffled = good[torch.randperm(len(good), generator=torch.Generator().manual_seed(0))]
    assert clip_score(good, texts) > clip_score(shuffled, texts) + 20
