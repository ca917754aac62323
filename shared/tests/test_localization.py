import torch

from vitbench.localization import on_box, on_box_share, random_share


def test_on_box_uses_patch_centres_and_ignores_cls_and_padding():
    # 4 x 4 grid on a 32 px input: patch centres at 4, 12, 20, 28 px
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]])  # covers the top-left 2 x 2 patches
    idx = torch.tensor([[0, 1, 2, 5, 6, 3, 16, -1]])
    hits = on_box(idx, boxes, (4, 4), 32)
    assert hits.tolist() == [[False, True, True, True, True, False, False, False]]
    assert abs(on_box_share(idx, boxes, (4, 4), 32).item() - 4 / 6) < 1e-6


def test_random_share_is_the_box_share_of_all_patches():
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 32.0, 32.0]])
    assert random_share(boxes, (4, 4), 32).tolist() == [4 / 16, 1.0]
