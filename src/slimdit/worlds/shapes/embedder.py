"""The shapes embedder: the embedding network of FID, CMMD and CLIP score in the shapes world.

A small CNN (image tower) and a small transformer over the shapes tokenizer (text tower) are trained
CLIP-style on scenes and their captions; an auxiliary head makes the image embedding count the objects of
each shape, colour and size, so that distances between image sets reflect what is in the pictures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import trange

from slimdit.io import load_tensors, save_tensors
from slimdit.worlds.shapes.prompts import TrainingSet
from slimdit.worlds.shapes.scenes import COLOR_LIST, SHAPES, SIZES_LIST, PlacedObject, render
from slimdit.worlds.shapes.text import MAX_SEQUENCE_LENGTH, build_tokenizer


@dataclass
class EmbedderConfig:
    dim: int = 128
    text_dim: int = 64
    steps: int = 800
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 1


class ImageTower(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),  # (N, 32, 32, 32)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),  # (N, 64, 16, 16)
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GELU(),  # (N, 128, 8, 8)
            nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.GELU(),  # (N, 128, 4, 4)
        )
        # flatten rather than pool: where things are matters in this world
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.GELU(), nn.Linear(256, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x))


class TextTower(nn.Module):
    def __init__(self, vocab_size: int, width: int, dim: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(MAX_SEQUENCE_LENGTH, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.proj = nn.Linear(width, dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.tok(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=mask == 0)  # (N, L, W)
        m = mask.unsqueeze(-1).float()
        return self.proj((h * m).sum(1) / m.sum(1).clamp_min(1))


class ShapesEmbedder(nn.Module):
    """Image and text towers into one embedding space; ``embed_*`` return raw (unnormalised) embeddings."""

    name = "shapes"

    def __init__(self, cfg: EmbedderConfig | None = None):
        super().__init__()
        self.cfg = cfg or EmbedderConfig()
        self.tokenizer = build_tokenizer()
        self.image = ImageTower(self.cfg.dim)
        self.text = TextTower(len(self.tokenizer), self.cfg.text_dim, self.cfg.dim)
        self.counts = nn.Linear(self.cfg.dim, len(_ATTRS))
        self.logit_scale = nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))

    @staticmethod
    def preprocess(images: np.ndarray) -> torch.Tensor:
        """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) in [-1, 1]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"shapes embedder takes (N, 32, 32, 3) uint8 images, got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        return torch.cat([self.image(self.preprocess(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])

    def _tokens(self, texts: list[str]):
        return self.tokenizer(list(texts), padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                              return_tensors="pt")

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        self.eval()
        tok = self._tokens(texts)
        return self.text(tok.input_ids, tok.attention_mask)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(d / "model.safetensors", self.state_dict())
        (d / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ShapesEmbedder:
        d = Path(directory)
        model = cls(EmbedderConfig(**json.loads((d / "config.json").read_text())))
        model.load_state_dict(load_tensors(d / "model.safetensors"))
        return model.eval()


_ATTRS = [(s, c) for s in SHAPES for c in COLOR_LIST] + [(s, z) for s in SHAPES for z in SIZES_LIST]


def attribute_counts(objs: list[PlacedObject]) -> np.ndarray:
    """How many objects of each (shape, colour) and (shape, size) a scene holds."""
    v = np.zeros(len(_ATTRS), dtype=np.float32)
    index = {a: i for i, a in enumerate(_ATTRS)}
    for o in objs:
        v[index[(o.shape, o.color)]] += 1
        v[index[(o.shape, o.size)]] += 1
    return v


def train_embedder(out_dir: str | Path, cfg: EmbedderConfig | None = None) -> ShapesEmbedder:
    """Train the shapes embedder (contrastive image-caption loss plus object counts) and save it."""
    cfg = cfg or EmbedderConfig()
    torch.manual_seed(cfg.seed)
    model = ShapesEmbedder(cfg)
    data = TrainingSet(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + np.cos(np.pi * min(s / cfg.steps, 1.0)))))
    model.train()
    bar = trange(cfg.steps, desc="shapes embedder", unit="step", dynamic_ncols=True)
    for step in bar:
        scenes = [data.scene(step * cfg.batch_size + i) for i in range(cfg.batch_size)]
        imgs = model.preprocess(np.stack([render(objs) for _, objs in scenes]))
        tok = model._tokens([p.text for p, _ in scenes])
        zi = model.image(imgs)
        zt = model.text(tok.input_ids, tok.attention_mask)
        logits = model.logit_scale.exp() * F.normalize(zi, dim=-1) @ F.normalize(zt, dim=-1).T
        # captions repeat within a batch: every image whose caption is identical is a positive
        same = torch.tensor([[a.text == b.text for b, _ in scenes] for a, _ in scenes], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2
        counts = torch.from_numpy(np.stack([attribute_counts(objs) for _, objs in scenes]))
        count_loss = F.mse_loss(model.counts(zi), counts)
        loss = contrastive + count_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(contrastive=f"{contrastive.item():.3f}", counts=f"{count_loss.item():.3f}")
    model.eval()
    model.save(out_dir)
    return model


def builtin_embedder_dir() -> Path:
    return Path(str(resources.files("slimdit.worlds.shapes").joinpath("weights", "shapes-embedder")))


def load_shapes_embedder() -> ShapesEmbedder:
    """Load the shipped shapes embedder."""
    d = builtin_embedder_dir()
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"the shapes embedder weights are missing from {d}; "
                                "rebuild them with `slimdit teacher train-embedder`")
    return ShapesEmbedder.load(d)
