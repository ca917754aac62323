"""``vitbench.models`` plugins (entry points that register timm models) and the analytic-count protocol of
``vitbench-flops`` (a model's own ``gmacs(img_size, layernorm)``), with a fake plugin: no method package needed."""

import json
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import timm

from vitbench import flops, models
from vitbench.engine.config import TrainConfig

MODULE = "vitbench_fake_model_plugin"
NAME = "vitbench_fake_convnet"
# A convolutional classifier with no patch grid: conv 4x4 / stride 4 (3 -> 8) + BatchNorm, mean pool, linear head.
# Its own count: conv MACs, BatchNorm at 2 per element when norms are counted, the head.
PLUGIN = f'''
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class FakeConvNet(nn.Module):
    def __init__(self, img_size=32, in_chans=3, num_classes=5):
        super().__init__()
        self.img_size, self.num_classes = img_size, num_classes
        self.conv = nn.Conv2d(in_chans, 8, 4, 4)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))

    def gmacs(self, img_size=None, layernorm=True):
        size = self.img_size if img_size is None else img_size
        if size < 4:
            raise ValueError(f"FakeConvNet cannot take {{size}} px")
        n = (size // 4) ** 2
        return (n * 4 * 4 * 3 * 8 + (2 * n * 8 if layernorm else 0) + 8 * self.num_classes) / 1e9


default_cfgs = generate_default_cfgs({{"{NAME}.untrained": dict(input_size=(3, 32, 32), num_classes=5)}})


@register_model
def {NAME}(pretrained=False, **kwargs):
    return build_model_with_cfg(FakeConvNet, "{NAME}", pretrained, **kwargs)
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin")
    (path / f"{MODULE}.py").write_text(textwrap.dedent(PLUGIN))
    return path


@pytest.fixture
def plugin(plugin_dir, monkeypatch):
    """The fake plugin is the one ``vitbench.models`` entry point (none of them imported yet)."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    eps = [EntryPoint(name="fake", value=MODULE, group=models.PLUGIN_GROUP)]
    monkeypatch.setattr(models, "entry_points", lambda group: [ep for ep in eps if ep.group == group])
    monkeypatch.setattr(models, "LOADED_PLUGINS", set())
    return eps


def test_a_plugin_is_imported_once_for_a_name_timm_does_not_know(plugin):
    if MODULE not in sys.modules:  # the registration outlives the test: only the first test sees it missing
        assert not timm.is_model(NAME)
    assert models.is_model("vit_digits_patch8_112") and models.LOADED_PLUGINS == set()  # known: nothing imported
    assert models.is_model(NAME) and timm.is_model(NAME)
    assert models.LOADED_PLUGINS == {MODULE} and models.load_model_plugins() == []
    models.check_model_name(NAME)
    assert models.create_model(NAME).num_classes == 5
    assert TrainConfig(model=NAME).model == NAME
    with pytest.raises(ValueError, match="unknown model"):
        TrainConfig(model="vitbench_no_such_model")


def test_a_broken_plugin_is_named_in_a_warning(monkeypatch):
    eps = [EntryPoint(name="broken", value="vitbench_no_such_plugin_module", group=models.PLUGIN_GROUP)]
    monkeypatch.setattr(models, "entry_points", lambda group: eps)
    monkeypatch.setattr(models, "LOADED_PLUGINS", set())
    with pytest.warns(UserWarning, match="plugin broken = 'vitbench_no_such_plugin_module' failed to import"):
        assert not models.is_model("vitbench_no_such_model")
    with pytest.raises(ValueError, match="unknown model"):
        models.check_model_name("vitbench_no_such_model")  # imported once: no second warning


def test_flops_cli_uses_the_models_own_count(plugin, tmp_path):
    out = tmp_path / "f.json"
    assert flops.main(["--model", NAME, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    n = 8 * 8
    assert result["img_size"] == 32 and "tokens" not in result and result["counted_by"] == "FakeConvNet.gmacs"
    assert result["gmacs"] == pytest.approx((n * 16 * 3 * 8 + 2 * n * 8 + 40) / 1e9)
    assert result["analytic_without_layernorm"] == pytest.approx((n * 16 * 3 * 8 + 40) / 1e9)
    assert result["flop_counter_gmacs"] == pytest.approx(result["analytic_without_layernorm"], rel=1e-9)
    assert flops.main(["--model", NAME, "--img-size", "64", "--no-layernorm", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["img_size"] == 64 and result["gmacs"] == pytest.approx(result["flop_counter_gmacs"], rel=1e-9)
    assert flops.main(["--model", NAME, "--img-size", "2", "--no-cross-check"]) == 2  # the model's own refusal


def test_flops_cli_refuses_a_model_with_neither_a_patch_grid_nor_a_count(capsys):
    assert flops.main(["--model", "resnet18", "--no-cross-check"]) == 2
    assert "not a ViT with a patch grid and has no gmacs()" in capsys.readouterr().err
