import torch
from vitbench.syncs import count_syncs


def test_early_exit_has_one_host_sync(digits_model):
    x = torch.randn(6, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conf = digits_model(x).location.softmax(-1).amax(-1).sort().values
    eta = float((conf[2] + conf[3]) / 2)  # half the images go on to the focus stage
    assert count_syncs(lambda t: digits_model.forward_early_exit(t, eta), x) == {"total": 1, "nonzero": 1}
    assert digits_model.last_record.exit_stage.sum() == 3
    assert count_syncs(digits_model, x) == {"total": 0}
