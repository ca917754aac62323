"""One command for a CUDA machine: do the three methods run right and fast there? No data or weights needed.

(a) ATS (rho 1), LF-ViT (early exit, eta sending ~22 % of the images to the focus stage) and Life-Regression (rho 0.7)
    on 8 images on CUDA vs CPU: top-1 agreement, largest logit difference, share of images with identical kept tokens
    / windows / kept patches, largest life difference.
(b) Throughput over batch {1, 64, 256, 1024} x {fp32, bf16} x {eager, compile}, DeiT-S geometry with peaked random
    weights, dense and the three methods side by side (vitbench.throughput.sweep), ratios next to the papers' (ATS
    1.39x, LF-ViT 2.03x, Life-Regression 1.40x), host syncs per forward, CUDA-event time and peak memory.
(c) Video: X-ViT-B/16 (8 x 224 px, peaked random weights) with ATS rho 1 on compacted tokens against dense X-ViT:
    CUDA vs CPU agreement on 2 clips, then batch {1, 8} x {fp32, bf16} x {eager, compile} with the ideal speed-up
    (GMACs ratio on the timed clips) and measured / ideal beside every ATS row.
(d) Everything as JSON (``--json``), rewritten after part (a) and after every sweep (``"complete": false`` until the
    end), with each sweep's table printed as it finishes.

    python tools/gpu_check.py --json runs/gpu_check.json

Without CUDA it stops at once (exit 2). Meant to finish within 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch

PAPER_SPEEDUP = {"ats": 1.39, "lfvit": 2.03, "liferegress": 1.40}
DEIT_S = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)
TINY = dict(img_size=48, patch_size=4, embed_dim=16, depth=12, num_heads=2, num_classes=10)  # for tests
VIDEO = "xvit_base_patch16_224_8f"
TINY_VIDEO = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=16, num_heads=2, num_classes=5)  # for tests
FOCUS_SHARE = 0.22


def build_models(geometry: dict, peak: float = 4.0, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Dense ViT (peaked random weights), ATS rho 1 and Life-Regression rho 0.7 on copies of it, LF-ViT alike."""
    from timm.models.vision_transformer import VisionTransformer

    import ats
    import liferegress
    from lfvit.model import LFVisionTransformer
    from vitbench.bench import peaked

    torch.manual_seed(seed)
    dense = peaked(VisionTransformer(**geometry), peak)
    torch.manual_seed(seed)
    lf = peaked(LFVisionTransformer(**geometry), peak)
    return {"dense": dense, "ats": ats.apply(copy.deepcopy(dense), rho=1.0),
            "lfvit": lf, "liferegress": liferegress.apply(copy.deepcopy(dense), keep_rate=0.7)}


def _callables(models: dict[str, torch.nn.Module], eta: float) -> dict[str, Callable]:
    lf = models["lfvit"]
    return {"dense": models["dense"], "ats": models["ats"], "lfvit": lambda t: lf.forward_early_exit(t, eta),
            "liferegress": models["liferegress"]}


def _selection(name: str, model: torch.nn.Module) -> list | None:
    """Per image, what the method chose in the last forward (compared exactly across runs)."""
    if name == "ats":
        kept = model.record.kept
        stages = zip(*(kept[b].tolist() for b in sorted(kept)))
        return [tuple(tuple(v for v in row if v >= 0) for row in image) for image in stages]
    if name == "lfvit":
        rec = model.record
        return list(zip(rec.exit_stage.tolist(), map(tuple, rec.window.tolist())))
    if name == "liferegress":
        return list(zip(*(map(tuple, k.tolist()) for k in model.record.kept_indices)))
    return None


def run_methods(models: dict[str, torch.nn.Module], images: torch.Tensor, eta: float, device: str,
                dtype: str = "fp32") -> dict[str, dict]:
    """Logits and selections of every method on ``device`` under the autocast ``dtype``."""
    from vitbench.throughput import precision

    out = {}
    dev = torch.device(device)
    x = images.to(dev)
    for name, fn in _callables({n: m.to(dev) for n, m in models.items()}, eta).items():
        with torch.inference_mode(), precision(dev, dtype):
            logits = fn(x)
        logits = logits.focus if hasattr(logits, "focus") else logits
        sel = _selection(name, models[name])
        lives = models[name].record.lives.float().cpu() if name == "liferegress" else None
        out[name] = {"logits": logits.float().cpu(), "selection": sel, "lives": lives}
    for m in models.values():
        m.to("cpu")
    return out


def agreement(models: dict[str, torch.nn.Module], images: torch.Tensor, device: str, ref_device: str = "cpu",
              dtype: str = "fp32", ref_dtype: str = "fp32") -> list[dict]:
    """Part (a): each method on ``device``/``dtype`` against ``ref_device``/``ref_dtype`` on the same images."""
    from lfvit.model import eta_for_share

    eta = eta_for_share(models["lfvit"], images, FOCUS_SHARE)
    ref = run_methods(models, images, eta, ref_device, ref_dtype)
    got = run_methods(models, images, eta, device, dtype)
    rows = []
    for name in ref:
        a, b = ref[name], got[name]
        row = {"method": name, "device": device, "dtype": dtype, "reference": f"{ref_device} {ref_dtype}",
               "top1_agreement": float((a["logits"].argmax(-1) == b["logits"].argmax(-1)).float().mean()),
               "logits_max_diff": float((a["logits"] - b["logits"]).abs().max())}
        if a["selection"] is not None:
            same = [x == y for x, y in zip(a["selection"], b["selection"])]
            row["identical_selection"] = sum(same) / len(same)
        if a["lives"] is not None:
            row["lives_max_diff"] = float((a["lives"] - b["lives"]).abs().max())
        rows.append(row)
    return rows


def compiled(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Copies compiled the way each method compiles best (dense and Life-Regression: one graph)."""
    from ats.patch import compile_ats

    out = {n: copy.deepcopy(m) for n, m in models.items()}
    out["dense"] = torch.compile(out["dense"], fullgraph=True)
    out["liferegress"] = torch.compile(out["liferegress"], fullgraph=True)
    compile_ats(out["ats"])
    out["lfvit"].compile_stages()
    return out


def throughput(models: dict[str, torch.nn.Module], batch_sizes: list[int], dtypes: list[str], modes: list[str],
               device: str, repeats: int, img_size: int,
               progress: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Part (b): :func:`vitbench.throughput.sweep` per dtype and mode; ``paper_speedup`` next to each ratio.
    ``progress`` gets the rows so far after every (mode, dtype) sweep."""
    from lfvit.model import eta_for_share
    from vitbench.throughput import sweep

    dev = torch.device(device)
    rows = []
    for mode in modes:
        ms = {n: m.to(dev) for n, m in (compiled(models) if mode == "compile" else models).items()}
        gen = torch.Generator().manual_seed(1)
        eta = eta_for_share(ms["lfvit"], torch.randn(64, 3, img_size, img_size, generator=gen).to(dev), FOCUS_SHARE)
        fns = _callables(ms, eta)
        for dtype in dtypes:
            for row in sweep(fns, lambda b: torch.randn(b, 3, img_size, img_size, device=dev), batch_sizes,
                             baseline="dense", dtype=dtype, warmup=2, repeats=repeats):
                row.update(mode=mode, paper_speedup=PAPER_SPEEDUP.get(row["name"]))
                rows.append(row)
            if progress is not None:
                progress(rows)
    return rows


def build_video_models(name: str = VIDEO, peak: float = 4.0, seed: int = 0, **kwargs) -> dict[str, torch.nn.Module]:
    """Dense video model ``name`` (peaked random weights, q/k scaled) and ATS rho 1 on a copy (compacted tokens)."""
    import timm

    import ats.video

    torch.manual_seed(seed)
    dense = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for blk in dense.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.attn_dim] *= peak
    return {"dense": dense, "ats": ats.video.apply(copy.deepcopy(dense), rho=1.0)}


def video_clips(model: torch.nn.Module, count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, model.num_frames, *model.patch_embed.img_size,
                       generator=torch.Generator().manual_seed(seed))


def video_agreement(models: dict[str, torch.nn.Module], clips: torch.Tensor, device: str) -> list[dict]:
    """Part (c), first half: dense and ATS on ``device`` against CPU fp32 (logits, kept tokens per clip)."""
    rows = []
    for name, model in models.items():
        out = {}
        for dev in ("cpu", device):
            with torch.inference_mode():
                logits = model.to(dev)(clips.to(dev)).float().cpu()
            kept = [v.cpu() for _, v in sorted(model.record.kept.items())] if name == "ats" else None
            out[dev] = logits, kept
        model.to("cpu")
        (a, ka), (b, kb) = out["cpu"], out[device]
        row = {"method": f"video {name}", "device": device, "top1_agreement": float((a.argmax(-1) == b.argmax(-1))
                                                                                    .float().mean()),
               "logits_max_diff": float((a - b).abs().max())}
        if ka is not None:
            row["identical_selection"] = float(all(torch.equal(x, y) for x, y in zip(ka, kb)))
        rows.append(row)
    return rows


def video_throughput(models: dict[str, torch.nn.Module], batch_sizes: list[int], dtypes: list[str], modes: list[str],
                     device: str, repeats: int, progress: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Part (c), second half: dense and ATS video models per dtype and mode (:func:`vitbench.throughput.sweep`),
    with ``ideal_speedup`` (dense GMACs / ATS's mean GMACs on the timed clips) and ``fraction_of_ideal``."""
    from ats.video import compile_ats
    from ats.video.flops import VideoGeometry, clip_gmacs, recorded_gmacs
    from vitbench.throughput import sweep

    dev = torch.device(device)
    dense_gmacs = float(clip_gmacs(VideoGeometry.from_model(models["dense"]))[0])
    rows = []
    for mode in modes:
        ms = {n: copy.deepcopy(m).to(dev) for n, m in models.items()}
        if mode == "compile":
            ms = {"dense": torch.compile(ms["dense"], fullgraph=True), "ats": compile_ats(ms["ats"])}
        for dtype in dtypes:
            for b in batch_sizes:
                clips = video_clips(models["dense"], b).to(dev)
                with torch.inference_mode():
                    ms["ats"](clips)
                ideal = dense_gmacs / float(recorded_gmacs(ms["ats"]).mean())
                for row in sweep(ms, lambda _, c=clips: c, [b], baseline="dense", dtype=dtype, warmup=2,
                                 repeats=repeats):
                    row.update(mode=mode, model=VIDEO, ideal_speedup=1.0 if row["name"] == "dense" else ideal)
                    row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
                    rows.append(row)
            if progress is not None:
                progress(rows)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="runs/gpu_check.json", help="where to write (c) (default: runs/gpu_check.json)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256, 1024],
                   help="throughput batch sizes (default: 1 64 256 1024)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per model and batch (default: 10)")
    p.add_argument("--no-compile", action="store_true", help="time eager models only (default: eager and compile)")
    p.add_argument("--video-batch-sizes", type=int, nargs="+", default=[1, 8],
                   help=f"clips per forward for the video rows ({VIDEO}; default: 1 8)")
    return p


def command(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise ValueError("no CUDA device here: this check compares CUDA against CPU and times CUDA; run it on a "
                         "machine with a GPU (nothing was run)")
    if any(b < 1 for b in args.batch_sizes + args.video_batch_sizes) or args.repeats < 1:
        raise ValueError("--batch-sizes, --video-batch-sizes and --repeats must be >= 1")
    from vitbench.cli import check_writable_file
    from vitbench.report import markdown_table, write_json

    check_writable_file(args.json)
    models = build_models(DEIT_S)
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    checks = agreement(models, images, "cuda") + agreement(models, images, "cuda", dtype="bf16")
    print(markdown_table(checks, ["method", "dtype", "top1_agreement", "logits_max_diff", "identical_selection",
                                  "lives_max_diff"], digits=4))
    columns = ["name", "mode", "dtype", "batch_size", "img_s", "speedup", "paper_speedup", "syncs", "cuda_ms",
               "peak_mib"]

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "complete": False, "agreement": checks,
              "throughput": [], "video": {}}

    def save(rows: list[dict], complete: bool, key: str = "throughput") -> None:  # after every sweep: a cut-off run
        result[key], result["complete"] = rows, complete  # keeps its part
        write_json(args.json, result)

    def progress(rows: list[dict]) -> None:
        save(rows, complete=False)
        last = rows[-1]
        print(markdown_table([r for r in rows if (r["mode"], r["dtype"]) == (last["mode"], last["dtype"])], columns),
              flush=True)

    save([], complete=False)
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    save(throughput(models, args.batch_sizes, ["fp32", "bf16"], modes, "cuda", args.repeats, 224, progress),
         complete=False)
    video = build_video_models()
    video_checks = video_agreement(video, video_clips(video["dense"], 2), "cuda")
    print(markdown_table(video_checks, ["method", "top1_agreement", "logits_max_diff", "identical_selection"],
                         digits=4))
    columns += ["ideal_speedup", "fraction_of_ideal"]
    save({"agreement": video_checks, "throughput": video_throughput(
        video, args.video_batch_sizes, ["fp32", "bf16"], modes, "cuda", args.repeats,
        lambda rows: progress(rows) or save({"agreement": video_checks, "throughput": rows}, False, "video"))},
         complete=True, key="video")
    print(f"GPU: {torch.cuda.get_device_name()}; JSON: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from vitbench.cli import run

    return run(build_parser(), command, argv)


if __name__ == "__main__":
    sys.exit(main())
