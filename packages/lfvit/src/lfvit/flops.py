"""Per-stage GFLOPs (= GMACs, fvcore conventions via :mod:`vitbench.flops`) as the released code reports them.

Localization: patch embedding of g^2 patches, the blocks on g^2 + 1 tokens, final norm, head. Focus: patch
embedding of all 4g^2 full-resolution patches, the fusion LayerNorm + MLP on the g^2 coarse tokens, the blocks on
1 + 4K + (g^2 - K) tokens (1 + 4g^2 without region selection), final norm, head. The released figures are
cumulative: [1.101957888, 3.810416256] for DeiT-S g 7 m 5.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitbench.flops import ViTGeometry, layernorm_macs, linear_macs, vit_macs

from .focus import focus_sequence_length
from .model import LFVisionTransformer


@dataclass(frozen=True)
class StageFlops:
    """GMACs per image: localization, focus (alone) and their sum (what an image reaching the focus stage costs)."""

    location: float
    focus: float
    focus_tokens: int

    @property
    def cumulative(self) -> float:
        return self.location + self.focus

    def expected(self, focus_fraction: float) -> float:
        """Mean GMACs when ``focus_fraction`` of the images reach the focus stage."""
        return self.location + focus_fraction * self.focus


def stage_flops(model: LFVisionTransformer, layernorm: bool = True) -> StageFlops:
    """Analytic per-stage GMACs of ``model`` at its current m, alpha and region-selection setting."""
    fine = ViTGeometry.from_model(model)
    g = model.grid
    location = vit_macs(fine.at_grid((g, g)), layernorm=layernorm)
    n = focus_sequence_length(g, model.num_cells) if model.region_selection else 4 * g * g + 1
    fusion = 2 * linear_macs(g * g, fine.dim, fine.mlp_ratio * fine.dim)
    if layernorm:
        fusion += layernorm_macs(g * g, fine.dim)
    focus = vit_macs(fine, [n] * fine.depth, layernorm=layernorm) + fusion
    return StageFlops(location / 1e9, focus / 1e9, n)


def dense_gflops(model: LFVisionTransformer, layernorm: bool = True) -> float:
    """GMACs of the dense backbone at full resolution (DeiT-S 224: 4.60)."""
    geom = ViTGeometry.from_model(model)
    return vit_macs(geom, layernorm=layernorm) / 1e9
