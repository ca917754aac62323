import timm
import torch

from vitbench.syncs import SyncCounter, count_syncs


def test_counts_each_kind_of_host_sync():
    x = torch.randn(4, 5)
    with torch.no_grad(), SyncCounter() as syncs:
        m = x > 0
        x[m]
        m.nonzero()
        torch.unique(x)
        x.max().item()
        x.tolist()
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert syncs.by_op == {"index": 1, "nonzero": 1, "_unique2": 1, "_local_scalar_dense": 1, "tolist": 1,
                           "repeat_interleave": 1}


def test_sync_free_ops_are_not_counted_and_tolist_is_restored():
    x = torch.randn(4, 5)
    original = torch.Tensor.tolist
    with torch.no_grad(), SyncCounter() as syncs:
        x.index_select(0, torch.tensor([0, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        x.masked_fill(x > 0, 0).sort(-1)
        torch.where(x > 0, x, 0).argsort(dim=-1, stable=True)
    assert syncs.total == 0
    assert torch.Tensor.tolist is original


def test_dense_vit_forward_has_no_sync():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    assert count_syncs(model, torch.randn(2, 3, 32, 32)) == {"total": 0}


def test_compiled_functions_are_counted_as_their_eager_program():
    from vitbench.syncs import count_syncs

    fn = torch.compile(lambda x: x[x > 0].sum(), backend="eager")
    assert count_syncs(fn, torch.randn(8)) == {"total": 1, "index": 1}
    full = torch.compile(torch.nn.Linear(3, 3), fullgraph=True, backend="eager")
    assert count_syncs(full, torch.randn(2, 3)) == {"total": 0}
