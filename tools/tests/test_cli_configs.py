"""The recipes in configs/: each file parses with its command (the folder's name) to exactly its values, and runs two
updates on the embedded data with small-run flags overriding it on the command line."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest
import yaml

from vitbench import cli, configfile

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))
SMALL = ["--cpu", "--max-steps", "2", "--limit-train", "8", "--limit-val", "8", "--batch-size", "4", "--epochs", "1",
         "--num-workers", "0", "--mixed-precision", "no", "--warmup-epochs", "0"]
# What stands in for the data and models of the paper recipes on this machine (no Hub, no ImageNet, no Kinetics).
EMBEDDED = {
    "deit_small": ["--data", "digits", "--model", "vit_digits_patch8_112"],
    "lfvit": ["--data", "digits", "--model", "lfvit_vit_digits_patch8_112", "--region-size", "5"],
    "xvit": ["--data", "moving-digits", "--model", "xvit_digits_patch8_64"],
    "timesformer": ["--data", "moving-digits", "--model", "timesformer_digits_patch8_64"],
    "digits": ["--data", "digits"],
}


def command(path: Path):
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name=path.parent.name)
    return importlib.import_module(entry.value.split(":")[0])


def stand_in(path: Path) -> list[str]:
    if path.parent.name == "lfvit-train":
        return EMBEDDED["lfvit"] if "imagenet" in path.stem else EMBEDDED["digits"]
    key = next((k for k in EMBEDDED if path.stem.startswith(k)), None)
    return EMBEDDED[key] if key else []


def test_every_recipe_is_listed():
    assert len(CONFIGS) >= 12
    listed = (ROOT / "configs" / "README.md").read_text()
    assert all(str(p.relative_to(ROOT / "configs")) in listed for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_recipe_parses_to_its_values(path):
    module = command(path)
    parser = cli.prepare(module.build_parser())
    args = cli.parse(parser, ["-c", str(path)])
    data = yaml.safe_load(path.read_text())
    values = configfile.read(path, parser)
    assert set(values) == {str(k).replace("-", "_") for k in data}
    for key, value in values.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_recipe_runs_two_updates_on_the_embedded_data(path, tmp_path):
    module = command(path)
    out = tmp_path / "run"
    assert module.main(["-c", str(path), *stand_in(path), *SMALL, "--output-dir", str(out)]) == 0
    # liferegress-train: one folder per stage (stage1, stage2 or single), each a run of its own
    assert list(out.rglob("model.safetensors")) and list(out.rglob("config.json"))
