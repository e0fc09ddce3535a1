"""Low-rank (SVD) layers: eq. 4.7-4.9 of the thesis, and iterative re-compression (section 4.4.3)."""

from __future__ import annotations

import torch
import torch.nn as nn


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank keeping a fraction ``1 - ratio`` of an n x m layer's weights: k = max(1, int(n m (1-c) / (n+m))).

    Eq. 4.9 of the thesis.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"a compression ratio is a removal fraction in [0, 1), got {ratio}")
    return max(1, int(out_features * in_features * (1.0 - ratio) / (out_features + in_features)))


class LowRankLinear(nn.Module):
    """``x -> A (B x) + b`` with ``A = U_k sqrt(S_k)`` (out x k) and ``B = sqrt(S_k) V_k^T`` (k x in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # B
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # A, b

    def forward(self, x):
        return self.up(self.down(x))

    @property
    def weight_product(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int,
                    keep: torch.Tensor | None = None) -> LowRankLinear:
        """Factor ``weight`` by SVD in float32 (float64 when ill-conditioned), whatever its dtype.

        ``keep`` selects which singular values to keep (GRASP, section 4.4.4); default: the ``rank`` largest.
        """
        out_f, in_f = weight.shape
        if not 1 <= rank <= min(out_f, in_f):
            raise ValueError(f"rank must be in [1, {min(out_f, in_f)}] for a {out_f}x{in_f} layer, got {rank}")
        w = weight.detach().float()
        try:
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            if not torch.isfinite(S).all() or S[0] / S[-1].clamp_min(1e-30) > 1e6:
                raise torch.linalg.LinAlgError("ill-conditioned")
        except torch.linalg.LinAlgError:
            U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
        idx = keep if keep is not None else torch.arange(rank)
        if len(idx) != rank:
            raise ValueError(f"keep selects {len(idx)} singular values, rank is {rank}")
        root = S[idx].sqrt()
        layer = cls(in_f, out_f, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.up.weight.copy_((U[:, idx] * root).to(weight.dtype))
            layer.down.weight.copy_((root[:, None] * Vh[idx]).to(weight.dtype))
            if bias is not None:
                layer.up.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, keep: torch.Tensor | None = None) -> LowRankLinear:
        """Factor a dense ``nn.Linear``, or re-compress a ``LowRankLinear`` from ``W_t = A_t B_t`` (4.4.3)."""
        if isinstance(linear, LowRankLinear):
            return cls.from_weight(linear.weight_product, linear.up.bias, rank, keep)
        return cls.from_weight(linear.weight, linear.bias, rank, keep)

    def to_linear(self) -> nn.Linear:
        """Merge to a dense layer (for export)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None,
                          device=self.up.weight.device, dtype=self.up.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_((self.up.weight.float() @ self.down.weight.float()).to(dense.weight.dtype))
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    return layer.out_features, layer.in_features


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
