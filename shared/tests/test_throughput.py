import json
import math

import pytest
import torch

from vitbench.throughput import compare, main, measure, transpose_linear_weights


def test_compare_returns_finite_positive_rates_relative_to_baseline():
    small = torch.nn.Linear(16, 16)
    large = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    rows = compare({"small": small, "large": large}, torch.randn(8, 16), baseline="small", warmup=1, repeats=3)
    by = {r["name"]: r for r in rows}
    assert set(by) == {"small", "large"}
    assert by["small"]["speedup"] == 1.0
    for r in rows:
        assert math.isfinite(r["img_s"]) and r["img_s"] > 0 and r["median_ms"] > 0 and r["batch_size"] == 8
    assert measure(small, torch.randn(4, 16), warmup=0, repeats=1)["img_s"] > 0


def test_transposed_linear_weights_keep_values_keys_and_layout(tmp_path):
    import copy

    import timm

    from vitbench.models import read_state_dict, save_weights

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5).eval()
    laid = transpose_linear_weights(copy.deepcopy(model))
    fc1 = laid.blocks[0].mlp.fc1.weight
    assert fc1.shape == model.blocks[0].mlp.fc1.weight.shape and fc1.stride() == (1, fc1.shape[0])
    assert fc1.t().is_contiguous() and laid.patch_embed.proj.weight.is_contiguous()  # only nn.Linear weights
    state, laid_state = model.state_dict(), laid.state_dict()
    assert list(laid_state) == list(state) and all(torch.equal(laid_state[k], v) for k, v in state.items())
    for moved in (copy.deepcopy(laid), copy.deepcopy(laid).to(torch.float64)):  # the layout survives copies, casts
        assert moved.blocks[0].attn.qkv.weight.t().is_contiguous()
    saved = read_state_dict(save_weights(laid, tmp_path / "w.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    fresh = transpose_linear_weights(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                                       num_classes=5))
    fresh.load_state_dict(state)  # loading copies into the transposed storage
    assert fresh.head.weight.t().is_contiguous() and torch.equal(fresh.head.weight, model.head.weight)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(laid(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(laid(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-5)


def test_compare_rejects_bad_arguments():
    with pytest.raises(ValueError):
        compare({"a": torch.nn.Identity()}, torch.randn(2, 3), baseline="b")
    with pytest.raises(ValueError):
        compare({"a": torch.nn.Identity()}, torch.randn(2, 3), repeats=0)
    with pytest.raises(ValueError):
        compare({"a": torch.nn.Identity()}, torch.randn(2, 3), clock="sundial")


def test_thread_clock_counts_cpu_work():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = compare({"mm": lambda x: x @ x}, torch.randn(64, 64), warmup=0, repeats=2, clock="thread")
    finally:
        torch.set_num_threads(threads)
    assert rows[0]["clock"] == "thread" and rows[0]["img_s"] > 0


def test_cli(tmp_path):
    out = tmp_path / "t.json"
    assert main(["--models", "vit_digits_patch8_112", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                 "--json", str(out)]) == 0
    assert out.is_file()


def test_cli_json_replaces_only_its_own_earlier_output(tmp_path, capsys):
    """--json onto an evaluation's results.json is refused before any timing (exit 2, file byte-identical); onto its
    own earlier output it is replaced."""
    evaluation = tmp_path / "results.json"
    evaluation.write_text(json.dumps({"config": {}, "environment": {}, "data": {}, "rows": []}))
    before = evaluation.read_bytes()
    argv = ["--models", "vit_digits_patch8_112", "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--json"]
    assert main([*argv, str(evaluation)]) == 2
    assert "is not an earlier result of this command; it is never replaced" in capsys.readouterr().err
    assert evaluation.read_bytes() == before
    out = tmp_path / "t.json"
    assert main([*argv, str(out)]) == 0 and main([*argv, str(out), "--batch-size", "2"]) == 0
    assert json.loads(out.read_text())["rows"][0]["batch_size"] == 2 and not list(tmp_path.glob("*.tmp"))
