"""ats-eval and ats-train on video: tiny moving-digits clips, the embedded X-ViT geometry, CPU, seconds."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from vitbench.models import EMBEDDED_WEIGHTS, read_state_dict, save_weights
from vitbench.testing import one_line_error, read_valid_result
from vitbench.video import views_forward

from ats import evaluate, train, video
from ats.options import ATSEvalConfig
from ats.paper import VIDEO
from ats.video import evaluate as video_eval
from ats.video.flops import dense_gmacs

DATA = "moving-digits:train_size=4,val_size=3,frames=8"
MODEL = "xvit_digits_patch8_64"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VITBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "vitbench-cache"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(MODEL)
    with torch.no_grad():  # peaked attention, so that ATS keeps a clip-dependent number of tokens
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.attn_dim] *= 4.0
    return str(save_weights(model, tmp_path_factory.mktemp("w") / "xvit.safetensors"))


def _eval_args(tmp_path, *extra):
    return ["--data", DATA, "--model", MODEL, "--limit", "2", "--batch-size", "2", "--num-workers", "0",
            "--repeats", "1", "--warmup", "0", "--throughput-batch", "2", "--output-dir", str(tmp_path / "eval"),
            *extra]


def test_views_forward_averages_the_softmax_over_views():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    clips = torch.randn(2, 3, 3, 2, 4, 4)  # [B, V, C, T, H, W]
    out = views_forward(model, clips)
    expected = torch.stack([model(clips[:, v]).softmax(-1) for v in range(3)], 1).mean(1).log()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(views_forward(model, clips[:, 0]), model(clips[:, 0]).log_softmax(-1))


def test_ats_eval_on_video_end_to_end(tmp_path, weights):
    out = tmp_path / "r.json"
    assert evaluate.main(_eval_args(tmp_path, "--checkpoint", weights, "--finetuned", weights, "--rho", "0.7",
                                    "--json", str(out))) == 0
    res = read_valid_result(out)
    dense, ots, ft = res["rows"]
    assert [r["series"] for r in res["rows"]] == ["dense", "ATS off-the-shelf", "ATS fine-tuned"]
    assert res["data"]["images"] == 2 and dense["images"] == 2
    assert dense["gflops"] == pytest.approx(3 * dense_gmacs(MODEL))  # 1 x 3 views per clip
    assert 0 < ots["gflops"] < dense["gflops"] and ots["setting"]["stages"] == list(range(3, 12))
    assert (ots["top1"], ots["gflops"]) == (ft["top1"], ft["gflops"])  # same weights, same numbers
    assert len(ots["extra"]["kept_per_frame_mean"]) == 9 and len(ots["extra"]["kept_per_frame_mean"][0]) == 8
    assert all(1 + 8 <= t <= 1 + 8 + 8 * 64 for t in ots["extra"]["tokens_out_min"])  # T CLS tokens + patches
    assert all(r["img_s"] > 0 for r in res["rows"])
    assert (tmp_path / "eval" / "frames_ATS_off-the-shelf_rho_0.7.png").is_file()


def test_video_data_alone_selects_the_embedded_video_model(tmp_path):
    out = tmp_path / "f.json"
    assert evaluate.main(["--flops-only", "--data", "moving-digits", "--json", str(out),
                          "--output-dir", str(tmp_path / "o")]) == 0
    res = read_valid_result(out)
    assert res["config"]["model"] == "xvit_digits_patch8_64"
    assert res["rows"][0]["gflops"] == pytest.approx(3 * dense_gmacs("xvit_digits_patch8_64"))


def test_video_flops_only_uses_the_papers_stages_and_numbers(tmp_path):
    out = tmp_path / "f.json"
    assert evaluate.main(["--flops-only", "--model", "timesformer_digits_patch8_64", "--data", "moving-digits",
                          "--json", str(out), "--output-dir", str(tmp_path / "o")]) == 0
    dense, ats = read_valid_result(out)["rows"]
    assert dense["gflops"] == pytest.approx(3 * dense_gmacs("timesformer_digits_patch8_64"))
    assert ats["setting"]["stages"] == [3, 4, 5] and ats["setting"]["rho"] == 1.0 and ats["gflops"] is None
    paper = VIDEO[("timesformer_l_patch16_224", 400)]
    assert paper[1] == (80.7, 7140.0) and paper[2] == (80.5, 3510.0)


@pytest.mark.parametrize(("argv", "match"), [
    (["--data", DATA, "--model", "deit_tiny_patch16_224"], "is video data: give a video --model"),
    (["--model", MODEL], "is a video model: give --data moving-digits"),
    (["--data", DATA, "--model", MODEL, "--k", "600"], "exceeds the 513 patch tokens"),
    (["--data", DATA, "--model", MODEL, "--stages", "3-14"], "stages"),
    (["--data", DATA, "--model", MODEL, "--preset", "table1"], "--preset and --variant"),
    (["--data", DATA, "--model", MODEL, "--checkpoint", "{tmp}/missing.pyth"], "checkpoint not found"),
])
def test_bad_video_eval_input_is_one_line(tmp_path, capsys, argv, match):
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--output-dir", str(tmp_path / "o"), "--num-workers", "0"]
    one_line_error(evaluate.main, argv, capsys, match)


def test_corrupt_video_file_is_named(tmp_path, capsys, weights):
    from vitbench.video import MovingDigitsConfig, export

    root = export(tmp_path / "folder", MovingDigitsConfig(train_size=2, val_size=2, frames=8))
    bad = sorted((root / "val").rglob("*.mp4"))[0]
    bad.write_bytes(b"not a video")
    argv = _eval_args(tmp_path, "--checkpoint", weights, "--no-throughput")
    argv[1] = f"videofolder:{root}"
    err = one_line_error(evaluate.main, argv, capsys, "cannot decode video")
    assert str(bad) in err


def test_image_backbone_inflates_into_both_video_models():
    state = read_state_dict(EMBEDDED_WEIGHTS)
    for name in ("timesformer_digits_patch8_64", MODEL):
        model = video.load_video_checkpoint(timm.create_model(name), str(EMBEDDED_WEIGHTS))
        own = model.state_dict()
        assert own["pos_embed"].shape == (1, 65, 64) and state["pos_embed"].shape == (1, 197, 64)
        torch.testing.assert_close(own["blocks.5.mlp.fc1.weight"], state["blocks.5.mlp.fc1.weight"].float())
        torch.testing.assert_close(own["pos_embed"][:, 0], state["pos_embed"][:, 0].float())  # CLS position kept
        if name.startswith("timesformer"):  # temporal attention starts as the spatial one (released init)
            torch.testing.assert_close(own["blocks.2.temporal_attn.qkv.weight"], own["blocks.2.attn.qkv.weight"])
            torch.testing.assert_close(own["head.weight"], state["head.weight"].float())
            assert not own["blocks.2.temporal_fc.weight"].any()


def _train_args(out, *extra):
    return ["--data", DATA, "--model", MODEL, "--checkpoint", str(EMBEDDED_WEIGHTS), "--cpu", "--epochs", "1",
            "--batch-size", "2", "--limit-val", "1", "--num-workers", "0", "--warmup-epochs", "0",
            "--output-dir", str(out), *extra]


def test_ats_train_on_clips_resumes_to_the_same_weights(tmp_path):
    assert train.main(_train_args(tmp_path / "full", "--max-steps", "2")) == 0
    assert train.main(_train_args(tmp_path / "split", "--max-steps", "1", "--checkpointing-steps", "1")) == 0
    assert train.main(_train_args(tmp_path / "split", "--max-steps", "2", "--resume", "auto")) == 0
    full, split = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "split"))
    assert full.keys() == split.keys() and "consensus.cls_token" in full
    for key in full:
        torch.testing.assert_close(full[key], split[key], rtol=0, atol=0, msg=key)
    start = video.load_video_checkpoint(timm.create_model(MODEL), str(EMBEDDED_WEIGHTS)).state_dict()
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], full["blocks.0.attn.qkv.weight"])  # it trained
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["ats"]["stages"] == list(range(3, 12)) and config["ats"]["rho"] == 1.0  # X-ViT: App. E.4


@pytest.mark.parametrize(("extra", "match"), [
    (["--mixup", "0.8"], "--mixup: image augmentation"),
    (["--variant", "topk"], "ablations are built for image models"),
    (["--pretrained"], "no pretrained weights are shipped"),
])
def test_bad_video_train_input_is_one_line(tmp_path, capsys, extra, match):
    one_line_error(train.main, _train_args(tmp_path / "o", *extra), capsys, match)


def test_shipped_video_weights_load_strictly_and_are_the_defaults():
    from vitbench.evaluation import EvalConfig

    cfg = EvalConfig(data="moving-digits", model=MODEL)
    model = video_eval.load_weights(cfg, video_eval.create_model(cfg))
    assert model.consensus.cls_token.abs().sum() > 0  # trained, not the zero initialisation
    assert video_eval.finetuned_path(cfg, ATSEvalConfig()) == video_eval.FINETUNED_WEIGHTS
    tuned = video.load_video_checkpoint(timm.create_model(MODEL), str(video_eval.FINETUNED_WEIGHTS))
    assert not torch.equal(tuned.blocks[5].attn.qkv.weight, model.blocks[5].attn.qkv.weight)


def test_shipped_timesformer_weights_are_its_defaults():
    from vitbench.evaluation import EvalConfig

    name = "timesformer_digits_patch8_64"
    cfg = EvalConfig(data="moving-digits", model=name)
    model = video_eval.load_weights(cfg, video_eval.create_model(cfg))
    assert model.time_embed.abs().sum() > 0 and model.blocks[3].temporal_fc.weight.abs().sum() > 0  # trained
    tuned_path = video_eval.finetuned_path(cfg, ATSEvalConfig())
    assert tuned_path == video_eval.shipped_weights(name, finetuned=True)
    tuned = video.load_video_checkpoint(timm.create_model(name), str(tuned_path))
    assert not torch.equal(tuned.blocks[4].attn.qkv.weight, model.blocks[4].attn.qkv.weight)
