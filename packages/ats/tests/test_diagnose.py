import pytest
import torch

import ats
from ats import diagnose, patch
from vitbench.testing import tiny_vit


def test_positions_from_mask_cls_first_token_order_padded():
    keep = torch.tensor([[False, True, False, True], [False, False, True, False]])
    assert diagnose.positions_from_mask(keep).tolist() == [[0, 2, 4], [0, 3, -1]]


def test_count_masks_keep_the_requested_counts():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.4, 0.3, 0.2, 0.1]])
    count = torch.tensor([2, 1])
    assert diagnose.top_count_mask(scores, count).tolist() == [[False, True, False, True], [True, False, False, False]]
    rnd = diagnose.random_count_mask((2, 50), torch.tensor([7, 30]), torch.Generator().manual_seed(0))
    assert rnd.sum(-1).tolist() == [7, 30]
    again = diagnose.random_count_mask((2, 50), torch.tensor([7, 30]), torch.Generator().manual_seed(0))
    assert torch.equal(rnd, again)


def test_effective_tokens_uniform_and_one_hot():
    rows = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert diagnose.effective_tokens(rows).tolist() == pytest.approx([4.0, 1.0])


def test_high_norm_relative_to_the_image_median():
    norms = torch.tensor([[1.0, 1.0, 1.1, 5.0], [2.0, 2.0, 3.0, 3.9]])
    assert diagnose.high_norm(norms, 2.0).tolist() == [[False, False, False, True], [False, False, False, False]]


def test_block_stats_split_the_cls_row():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    row = torch.rand(3, 5).softmax(-1)
    on_object = torch.tensor([[True, False, False, True]] * 3)
    s = diagnose.block_stats(x, row, on_object, 2.0)
    assert torch.allclose(s.mass_object + s.mass_background + s.mass_cls, torch.ones(3))
    assert torch.allclose(s.norm_object, x[:, [1, 4]].norm(dim=-1).mean(-1))
    assert torch.allclose(s.norm_cls, x[:, 0].norm(dim=-1))


def test_finish_with_every_token_is_the_dense_model(images):
    model = tiny_vit()
    with torch.inference_mode():
        x = patch.embed(model, images)
        for blk in model.blocks[:4]:
            x = blk(x)
        every = torch.arange(x.shape[1]).expand(images.shape[0], -1)
        assert torch.allclose(diagnose.finish(model, x, every, 4), model(images), atol=1e-5)


def test_finish_on_padded_subsets_equals_each_image_alone(images):
    model = tiny_vit()
    keep = torch.zeros(images.shape[0], 49, dtype=torch.bool)
    for b in range(images.shape[0]):
        keep[b, torch.randperm(49, generator=torch.Generator().manual_seed(b))[: 5 + 4 * b]] = True
    positions = diagnose.positions_from_mask(keep)
    with torch.inference_mode():
        x = model.blocks[0](patch.embed(model, images))
        batched = diagnose.finish(model, x, positions, 1)
        for b in range(images.shape[0]):
            alone = positions[b : b + 1, : int(keep[b].sum()) + 1]
            assert torch.allclose(batched[b], diagnose.finish(model, x[b : b + 1], alone, 1)[0], atol=1e-5)


def test_top_k_by_ats_scores_is_the_topk_variant(images):
    """The diagnosis's Eq. 3 score reproduces ATS's own top-K selection at the same block."""
    model = tiny_vit()
    patched = ats.apply(tiny_vit(), stages=[3], k=12, variant="topk")
    with torch.inference_mode():
        x = patch.embed(model, images)
        for blk in model.blocks[:3]:
            x = blk(x)
        scores = diagnose.ats_scores(model.blocks[3].attn, model.blocks[3].norm1(x))
        patched(images)
    mine = diagnose.top_count_mask(scores, torch.full((images.shape[0],), 11))
    kept = patched.record.kept[3]
    theirs = diagnose.keep_masks(mine, kept, scores, torch.Generator())["ATS"]
    assert torch.equal(mine, theirs)


def test_keep_masks_counts():
    on_object = torch.tensor([[True, True, False, False, False], [False, False, False, True, False]])
    kept = torch.tensor([[0, 3, 1, -1], [0, 5, 2, 4]])  # original indices, CLS first, -1 padded
    scores = torch.rand(2, 5)
    masks = diagnose.keep_masks(on_object, kept, scores, torch.Generator().manual_seed(0))
    assert masks["ATS"].tolist() == [[True, False, True, False, False], [False, True, False, True, True]]
    for name in ("top-K (object count)", "random (object count)"):
        assert masks[name].sum(-1).tolist() == [2, 1]
    for name in ("top-K (ATS count)", "random (ATS count)"):
        assert masks[name].sum(-1).tolist() == [2, 3]
    assert torch.equal(masks["background"], ~on_object)


@pytest.mark.parametrize("argv,message", [(["--block", "-1"], "--block must be >= 0"),
                                          (["--checkpoint", "missing.safetensors"], "does not exist"),
                                          (["--outlier-factor", "1"], "--outlier-factor must be > 1")])
def test_cli_errors_are_one_line(capsys, tmp_path, argv, message):
    assert diagnose.main([*argv, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ats-diagnose: error:") and message in err[0]


def test_cls_attention_row_is_a_distribution_matching_ats_cls_row(images):
    model = tiny_vit()
    with torch.inference_mode():
        h = model.blocks[0].norm1(patch.embed(model, images))
        row = diagnose.cls_attention_row(model.blocks[0].attn, h)
        q, k, _ = diagnose._qkv(model.blocks[0].attn, h)
        n = torch.full((images.shape[0],), h.shape[1])
        reference = ats.sampling.cls_attention(q[:, :, :1], k, model.blocks[0].attn.scale, n).mean(1)
    assert torch.allclose(row.sum(-1), torch.ones(images.shape[0]), atol=1e-5)
    assert torch.allclose(row, reference, atol=1e-6)
