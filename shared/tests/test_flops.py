import json

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vitbench.flops import ViTGeometry, block_macs, flop_counter_gmacs, main, vit_gmacs


def _gmacs(name, **kw):
    return vit_gmacs(ViTGeometry.from_model(timm.create_model(name, pretrained=False, **kw)))


@pytest.mark.parametrize(
    "name, kwargs, expected, tol",
    [
        ("deit_small_patch16_224", {}, 4.60, 0.01),
        ("deit_small_patch16_224", {"img_size": 112}, 1.10, 0.01),
        ("deit_tiny_patch16_224", {}, 1.25, 0.01),
        ("deit_base_patch16_224", {}, 17.6, 0.05),  # quoted to one decimal by the papers (ours: 17.58)
    ],
)
def test_papers_reference_figures(name, kwargs, expected, tol):
    assert abs(_gmacs(name, **kwargs) - expected) <= tol


def test_dense_block_formula():
    n, c = 197, 384
    assert block_macs(c, n, layernorm=False) == 12 * n * c * c + 2 * n * n * c
    assert block_macs(c, n) == 12 * n * c * c + 2 * n * n * c + 10 * n * c


class _DropHalf(VisionTransformer):
    """A ViT that keeps only the first half of its tokens after block 4 (a data-independent token reduction)."""

    def forward_features(self, x, **kwargs):
        x = self._pos_embed(self.patch_embed(x))
        for i, blk in enumerate(self.blocks):
            if i == 4:
                x = x[:, : 1 + (x.shape[1] - 1) // 2]
            x = blk(x)
        return self.norm(x)


@pytest.mark.parametrize("fused", [True, False])
def test_analytic_count_matches_flop_counter_for_token_reduced_model(fused):
    model = _DropHalf(img_size=64, patch_size=8, embed_dim=96, depth=8, num_heads=3, num_classes=10).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    geom = ViTGeometry.from_model(model)
    counts = [65] * 4 + [33] * 4
    measured = flop_counter_gmacs(model, torch.randn(2, 3, 64, 64))
    assert measured == pytest.approx(vit_gmacs(geom, counts, layernorm=False), rel=1e-6)
    assert measured == pytest.approx(vit_gmacs(geom, counts), rel=0.01)
    assert vit_gmacs(geom, counts) < vit_gmacs(geom)


def test_shrinking_block_counts_queries_and_outputs_separately():
    dense = block_macs(64, 100, layernorm=False)
    shrunk = block_macs(64, 100, n_out=40, layernorm=False)
    # qkv and Q K^T stay, A V / proj / MLP run on 40 rows
    assert dense - shrunk == pytest.approx(60 * 100 * 64 + 60 * 9 * 64 * 64)


def test_cli_json(tmp_path):
    out = tmp_path / "f.json"
    assert main(["--model", "deit_small_patch16_224", "--img-size", "112", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert abs(result["gmacs"] - 1.10) <= 0.01
    assert result["flop_counter_gmacs"] == pytest.approx(result["analytic_without_layernorm"], rel=1e-6)


def test_cli_json_replaces_only_its_own_earlier_output(tmp_path, capsys):
    """--json never replaces another command's file (a training run's results.json, a non-JSON file): exit 2, one
    line, the file byte-identical; its own earlier output is replaced."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"top1": 81.2, "updates": 10}\n')
    (tmp_path / "notes.txt").write_text("not JSON")
    argv = ["--model", "vit_digits_patch8_112", "--no-cross-check", "--json"]
    for other in (run / "results.json", tmp_path / "notes.txt"):
        before = other.read_bytes()
        assert main([*argv, str(other)]) == 2
        assert capsys.readouterr().err.strip() == (f"vitbench-flops: error: --json {other} exists and is not an "
                                                   "earlier result of this command; it is never replaced: give "
                                                   "another path")
        assert other.read_bytes() == before
    out = tmp_path / "f.json"
    assert main([*argv, str(out)]) == 0 and main([*argv, str(out), "--no-layernorm"]) == 0
    assert json.loads(out.read_text())["layernorm"] is False and not list(tmp_path.glob("*.tmp"))
