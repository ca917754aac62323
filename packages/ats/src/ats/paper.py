"""Every number of the ATS paper this package compares against (Fayyaz et al., ECCV 2022), images and video, and
the configurations that produced them: Table 1, Tables A.1/A.3/A.4, Figs. 5 and A.1 (DeiT-S on ImageNet) and
Tables 2, 3 and A.2 (video, 1 temporal x 3 spatial views). Figures whose points are not printed in the paper give
only their GFLOPs levels."""

from __future__ import annotations

from dataclasses import dataclass

MULTI = tuple(range(3, 12))  # the multi-stage placement, blocks 3..11 (0-based)
LATE = tuple(range(7, 12))  # blocks 7..11: on the embedded model, the placement nearest Table 1's GFLOPs share
DEFAULT_RHO = (1.0, 0.87, 0.72)  # the 3.0 / 2.5 / 2.0 GFLOPs levels of Fig. 5 on DeiT-S
DENSE = {"top1": 79.8, "gflops": 4.6}  # DeiT-S on ImageNet


def stage_text(stages) -> str:
    """``(3, ..., 11)`` -> ``3-11``; ``(0, 3, 6)`` -> ``0,3,6``."""
    s = list(stages)
    if len(s) > 1 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


@dataclass(frozen=True)
class Run:
    """One ATS configuration, with the paper's numbers (DeiT-S, ImageNet) when it is a paper setting."""

    stages: tuple[int, ...]
    k: float
    mode: str = "official"
    variant: tuple[str, ...] = ()
    series: str = "ATS"
    paper: tuple[tuple[str, float], ...] = ()
    paper_finetuned: tuple[tuple[str, float], ...] = ()
    placement_in_series: bool = False  # one series per placement ("ATS ... @ 7-11"), the points just rho / K

    @property
    def point(self) -> str:
        where = "" if self.stages == MULTI or self.placement_in_series else f" @ {stage_text(self.stages)}"
        return (f"rho {self.k:g}" if self.k <= 1 else f"K {self.k:g}") + where

    def series_for(self, tag: str) -> str:
        """This run's series name with ``tag`` (``off-the-shelf``, ``fine-tuned`` or empty)."""
        name = f"{self.series} {tag}".strip()
        return f"{name} @ {stage_text(self.stages)}" if self.placement_in_series else name

    @property
    def size(self) -> dict:
        """``{"rho": k}`` or ``{"k": k}`` (a value above 1 is an absolute K), as ``apply`` takes it."""
        return {"rho" if self.k <= 1 else "k": self.k}

    def params(self) -> dict:
        return {"stages": list(self.stages), **self.size, "mode": self.mode, "variant": list(self.variant)}


def numbers(top1, gflops) -> tuple[tuple[str, float], ...]:
    """A paper point as ``Run.paper`` holds it (missing values left out)."""
    return tuple((k, v) for k, v in (("top1", top1), ("gflops", gflops)) if v is not None)


def _ms(rho, top1=None, g=None, series="ATS", ft=None, **kw) -> Run:
    return Run(MULTI, rho, series=series, paper=numbers(top1, g), paper_finetuned=numbers(ft, g if ft else None), **kw)


def _ss(k, stage=3, top1=None, g=None, series="ATS single-stage", **kw) -> Run:
    return Run((stage,), k, series=series, paper=numbers(top1, g), **kw)


def late(rho: float) -> Run:
    """Blocks 7..11 at ``rho`` (the embedded backbone's placement at the paper's GFLOPs share; no paper numbers: the
    paper reports none for it)."""
    return Run(LATE, rho, placement_in_series=True)


# The default sweep: not fine-tuned rho 1 = 79.2 at 3.0 (Table A.4 / Fig. 5); fine-tuned rho 1 = 79.7 at 2.9 (Table 1).
DEFAULT_RUNS = (_ms(1.0, 79.2, 3.0), _ms(0.87, None, 2.5), _ms(0.72, None, 2.0))
PRESETS: dict[str, tuple[str, tuple[Run, ...]]] = {
    "table1": ("Table 1: fine-tuned multi-stage DeiT-S+ATS (use the fine-tuned checkpoint)",
               (_ms(1.0, 79.7, 2.9),)),
    "table-a1": ("Table A.1: throughput of DeiT-S+ATS vs DeiT-S (paper: 1403 vs 1010 img/s on an RTX6000)",
                 (_ms(1.0, 79.7, 2.9),)),
    "table-a3": ("Table A.3 / Fig. 5a: top-K vs inverse transform sampling (both fine-tuned)",
                 (_ms(0.865, 78.9, 2.9, series="ATS top-K", variant=("topk",)), _ms(1.0, 79.7, 2.9))),
    "fig5a": ("Fig. 5a: top-K (fixed rate, K_n = round(rho N_n)) vs inverse transform sampling, not fine-tuned",
              (_ms(0.865, None, 3.0, series="ATS top-K", variant=("topk",)),
               _ms(0.79, None, 2.5, series="ATS top-K", variant=("topk",)),
               _ms(0.665, None, 2.0, series="ATS top-K", variant=("topk",)), *DEFAULT_RUNS)),
    "table-a4": ("Table A.4: ATS placement at ~3 GFLOPs, not fine-tuned",
                 (_ss(130, 0, 73.1, 3.0), _ss(108, 3, 78.5, 3.0), _ss(56, 6, 77.4, 3.0), DEFAULT_RUNS[0])),
    "fig5b": ("Fig. 5b: multi-stage, not fine-tuned vs fine-tuned (give --finetuned PATH)", DEFAULT_RUNS),
    "fig5c": ("Fig. 5c: single-stage (block 3) vs multi-stage (blocks 3..11)",
              (_ss(108, 3, None, 3.0), _ss(78, 3, None, 2.5), _ss(48, 3, None, 2.0), *DEFAULT_RUNS)),
    "fig-a1": ("Fig. A.1: single-stage K sweep, fine-tuned (paper: K=48 -> 75% at 2 GFLOPs)",
               (_ss(108, 3, None, 3.0), _ss(78, 3, None, 2.5), _ss(48, 3, 75.0, 2.0))),
}
FINETUNED = {1.0: {"top1": 79.7, "gflops": 2.9}}  # Table 1: the fine-tuned rho 1 point

# Table 1, CvT on ImageNet: model -> (dense top-1 / GFLOPs, ATS fine-tuned top-1 / GFLOPs). ATS in stage 3's blocks
# 1-9 of a linear stage 3 at K = N (rho 1), fine-tuned 30 epochs from the pretrained CvT (App. E.2); the dense
# numbers are CvT's own (dw_bn).
CVT = {
    "cvt_13_224": ((81.6, 4.5), (81.4, 3.2)),
    "cvt_21_224": ((82.5, 7.1), (82.3, 5.1)),
    "cvt_13_384": ((83.0, 16.3), (82.9, 11.7)),
    "cvt_21_384": ((83.3, 24.9), (83.1, 17.4)),
}
# Table 1, PS-ViT on ImageNet: model -> (dense top-1 / GFLOPs, ATS fine-tuned top-1 / GFLOPs). ATS in layers 1-9 of
# the transformer module (Sec. 4), fine-tuned 30 epochs from the pretrained PS-ViT (App. E.3).
PSVIT = {
    "psvit_b14_224": ((81.7, 5.4), (81.5, 3.7)),
    "psvit_b18_224": ((82.3, 8.8), (82.2, 5.6)),
}


# Table A.5, EViT-DeiT-S (30 epochs) on ImageNet: model -> (EViT top-1 / GFLOPs, EViT + ATS fine-tuned 10 epochs
# top-1 / GFLOPs). ATS in blocks 4, 5, 7, 8, 10, 11 with K_n = round(0.7 x #InputTokens_n); the 100-epoch EViT
# (79.8 %) keeps the same GFLOPs and gains nothing from ATS in accuracy either (79.8 / 2.5).
EVIT = {"evit_deit_small_patch16_224": ((79.5, 3.0), (79.5, 2.5))}

# The models whose dense numbers Table 1 prints, by timm architecture: model -> (top-1, GFLOPs). DeiT-S is the
# backbone of every DeiT-S+ATS setting of this module; DeiT-B/16 is a comparison row; the CvTs are CVT's dense rows.
DENSE_MODELS: dict[str, tuple[float, float]] = {
    "deit_small_patch16_224": (DENSE["top1"], DENSE["gflops"]),
    "deit_base_patch16_224": (81.8, 17.6),
    **{m: dense for m, (dense, _) in CVT.items()},
    **{m: dense for m, (dense, _) in PSVIT.items()},
    **{m: dense for m, (dense, _) in EVIT.items()},  # Table 1's EViT-DeiT-S row (30 epochs), Table A.5's start
}
DEIT_S = "deit_small_patch16_224"  # the model of DEFAULT_RUNS, PRESETS and FINETUNED


def architecture(model: str) -> str:
    """timm's architecture of a model name: ``deit_small_patch16_224.fb_in1k`` -> ``deit_small_patch16_224``."""
    return model.split(".")[0]


def paper_input(model: str, img_size: int | None) -> bool:
    """Whether an evaluation of ``model`` at ``--img-size img_size`` (None: the model's own) is at the resolution
    Table 1 reports it at (384 px for the ``*_384`` models, 224 px for the others)."""
    return img_size in (None, 384 if architecture(model).endswith("_384") else 224)


def dense_paper(model: str, img_size: int | None = None) -> dict:
    """The paper's dense numbers for ``model`` (its Table 1 row: DeiT-S, DeiT-B, CvT); empty for a model the
    paper does not report, or at another input size than the paper's."""
    row = DENSE_MODELS.get(architecture(model))
    if row is None or not paper_input(model, img_size):
        return {}
    return dict(zip(("top1", "gflops"), row))


def reports_deit_s(model: str, img_size: int | None = None) -> bool:
    """Whether the DeiT-S settings' numbers (``Run.paper``, ``Run.paper_finetuned``, ``FINETUNED``) belong beside
    ``model``'s rows: DeiT-S at 224 px only."""
    return architecture(model) == DEIT_S and paper_input(model, img_size)


def cvt_finetuned_paper(model: str) -> tuple[tuple[str, float], ...]:
    """Table 1's fine-tuned ATS point of CvT (or PS-ViT) ``model`` as ``Run.paper_finetuned`` holds it (empty when
    not in it)."""
    table = {**CVT, **PSVIT}
    return numbers(*table[model][1]) if model in table else ()


# Video, 1 x 3 views, as printed. (model, classes): (table, dense top-1 / GFLOPs, ATS fine-tuned top-1 / GFLOPs).
VIDEO = {
    ("xvit_base_patch16_224_16f", 400): ("Table 2 (K400)", (80.2, 425.0), (80.0, 259.0)),
    ("xvit_base_patch16_224_16f", 600): ("Table 3 (K600)", (84.5, 850.0), (84.4, 521.0)),
    ("timesformer_l_patch16_224", 400): ("Table 2 (K400)", (80.7, 7140.0), (80.5, 3510.0)),
    ("timesformer_hr_patch16_448", 600): ("Table 3 (K600)", (82.4, 5110.0), (82.2, 3103.0)),
}
# Dense video backbones: (where, GFLOPs for 1 x 3 views). Table 2 prints 425 for "X-ViT (16x)": that is the
# 8-frame count (8 x ViT-B/16 x 3 views); Table 3 prints 850 for the same 16x model.
VIDEO_GFLOPS = {
    "timesformer_l_patch16_224": ("Table 2", 7140.0),
    "timesformer_hr_patch16_448": ("Table 3", 5110.0),
    "xvit_base_patch16_224_8f": ("Table 2 (as 16x)", 425.0),
    "xvit_base_patch16_224_16f": ("Table 3", 850.0),
}


def evit_finetuned_paper(model: str) -> tuple[tuple[str, float], ...]:
    """Table A.5's fine-tuned EViT + ATS point of ``model`` as ``Run.paper_finetuned`` holds it (empty when not in
    it)."""
    return numbers(*EVIT[model][1]) if model in EVIT else ()
