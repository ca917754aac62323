"""The paper's reported numbers (ImageNet, DeiT-S), printed beside the measured rows of ``lfvit-eval``."""

from __future__ import annotations

from .model import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_REGION_SIZE

# Table 2 (g 7): (m, eta, top-1 %, GFLOPs, A100 img/s); DeiT-S 79.8 / 4.6 / 2601.
TABLE2 = [(4, 0.62, 79.8, 1.8, 4960), (4, 0.77, 80.1, 2.2, 4415), (5, 0.47, 79.8, 1.7, 5271),
          (5, 0.61, 80.5, 2.0, 4637), (5, 0.76, 80.8, 2.5, 3686), (6, 0.46, 79.8, 1.8, 5210),
          (6, 0.65, 80.8, 2.4, 3764), (6, 0.85, 81.0, 3.0, 2889)]
# Table 3: (g, m, eta, top-1 %, GFLOPs).
TABLE3 = [(7, 5, 0.47, 79.8, 1.7), (7, 6, 0.65, 80.8, 2.4), (9, 8, 0.75, 82.2, 3.7)]
# Tables 4 and 5 (m 5, eta 0.76): beta / alpha -> top-1 %.
TABLE4 = {0.0: 80.5, 0.5: 80.6, 0.9: 80.7, 0.99: 80.8, 0.999: 80.8}
TABLE5 = {0.5: 80.1, 0.6: 80.2, 0.7: 80.6, 0.8: 80.6, 0.88: 80.8, 0.9: 80.7}
# Table 6 (m 5, no early exit): region mode -> (location, focus) top-1 %.
TABLE6 = {"negative_ngca": (75.3, 79.7), "max_gca": (75.8, 80.2), "min_gca": (75.4, 79.8), "random": (75.7, 80.0),
          "ngca": (76.1, 80.8)}
# Table 7 (m 5, no early exit): loss -> (location, focus) top-1 %.
TABLE7 = {"ce_ce": (76.1, 80.4), "ce_kl": (76.1, 80.8)}
DEIT_S = {"top1": 79.8, "gflops": 4.6, "img_s_a100": 2601}
ABLATION_ETA = 0.76


# The models the paper reports (DeiT-S with LF-ViT at 224 px, g 7, and LF-ViT* at 288 px, g 9): only their rows carry
# the paper's numbers.
PAPER_MODELS = ("lfvit_deit_small_patch16_224", "lfvit_deit_small_patch16_288")


def paper_numbers(grid: int, m: int, eta: float | None = None, alpha: float = DEFAULT_ALPHA,
                  beta: float = DEFAULT_BETA, loss: str = "ce_kl", region_mode: str | None = None,
                  dense: bool = False) -> dict:
    """The paper's reported numbers (ImageNet, DeiT-S) for one result row, ``{}`` where the paper has none.

    ``dense``: DeiT-S itself. With ``eta``: the early-exit operating point of Table 2 / Table 3 (``m``, ``eta``,
    ``grid``), or at Tables 4 / 5's eta 0.76 the beta / alpha ablation. Without ``eta`` (every image through both
    stages): Table 6's region-selection ``region_mode`` or, for NGCA, Table 7's ``loss``, as location / focus
    top-1."""
    if dense:
        return dict(DEIT_S)
    if eta is not None:
        for m_, eta_, top1, gflops, img_s in TABLE2:
            if grid == 7 and (m_, eta_) == (m, eta) and (alpha, beta) == (DEFAULT_ALPHA, DEFAULT_BETA):
                return {"top1": top1, "gflops": gflops, "img_s_a100": img_s}
        for g_, m_, eta_, top1, gflops in TABLE3:
            if (g_, m_, eta_) == (grid, m, eta):
                return {"top1": top1, "gflops": gflops}
        if m == DEFAULT_REGION_SIZE and eta == ABLATION_ETA and beta != DEFAULT_BETA and beta in TABLE4:
            return {"top1": TABLE4[beta]}
        if m == DEFAULT_REGION_SIZE and eta == ABLATION_ETA and alpha != DEFAULT_ALPHA and alpha in TABLE5:
            return {"top1": TABLE5[alpha]}
        return {}
    if m != DEFAULT_REGION_SIZE or grid != 7:
        return {}
    pair = TABLE7.get(loss) if region_mode in (None, "ngca") else TABLE6.get(region_mode)
    return {} if pair is None else {"location_top1": pair[0], "focus_top1": pair[1]}
