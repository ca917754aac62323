"""The paper's reported numbers (Tables I-V), for printing next to measured ones."""

from __future__ import annotations

# (timm architecture, keep rate or None for the backbone) -> top-1, top-5, GFLOPs, img/s (Quadro P6000, batch 128)
TABLES_I_III: dict[tuple[str, float | None], tuple[float, float, float, float]] = {
    ("deit_small_patch16_224", None): (79.8, 95.0, 4.6, 503.9),
    ("deit_small_patch16_224", 0.9): (79.7, 94.8, 4.1, 512.5),
    ("deit_small_patch16_224", 0.8): (79.5, 94.8, 3.6, 601.3),
    ("deit_small_patch16_224", 0.7): (79.3, 94.7, 3.2, 704.8),
    ("deit_base_patch16_224", None): (82.0, 95.7, 17.6, 186.4),
    ("deit_base_patch16_224", 0.7): (80.1, 94.7, 12.3, 262.0),
    ("vit_tiny_patch16_224", None): (75.5, 92.8, 1.3, 1212.1),
    ("vit_tiny_patch16_224", 0.7): (73.6, 91.8, 0.9, 1573.8),
    ("vit_small_patch16_224", None): (81.4, 96.1, 4.6, 504.7),
    ("vit_small_patch16_224", 0.7): (79.8, 95.3, 3.2, 723.3),
    ("vit_base_patch16_224", None): (84.5, 97.3, 17.6, 187.1),
    ("vit_base_patch16_224", 0.7): (82.3, 96.4, 12.3, 256.0),
}
# Table IV (DeiT-S): (scheme, keep rate) -> top-1, top-5
TABLE_IV = {
    ("single", 0.9): (78.7, 93.4), ("single", 0.8): (78.5, 92.1), ("single", 0.7): (78.3, 91.9),
    ("two", 0.9): (79.8, 95.2), ("two", 0.8): (79.5, 95.0), ("two", 0.7): (79.3, 94.7),
}
# Table V (DeiT-S, keep rate 0.7): temperature U -> top-1, top-5
TABLE_V = {0.5: (79.0, 94.4), 1.0: (79.2, 94.6), 1.5: (79.3, 94.7), 2.0: (79.2, 94.5), 3.0: (79.2, 94.5)}


def paper_row(model: str, keep_rate: float | None, scheme: str = "two", temperature: float = 1.5) -> dict:
    """The paper's numbers for a configuration (empty when the paper has none); keys ``paper_top1`` etc."""
    arch = model.split(".")[0]
    if scheme == "single" or temperature != 1.5:
        if arch != "deit_small_patch16_224" or keep_rate is None:
            return {}
        if scheme == "single":
            values = TABLE_IV.get(("single", keep_rate))
        else:
            values = TABLE_V.get(temperature) if keep_rate == 0.7 else None
        return {} if values is None else {"paper_top1": values[0], "paper_top5": values[1]}
    values = TABLES_I_III.get((arch, keep_rate))
    if values is None:
        return {}
    return dict(zip(("paper_top1", "paper_top5", "paper_gflops", "paper_img_s"), values))
