import os

import pytest

# Tests never touch the network or the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VITBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "vitbench-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))


@pytest.fixture
def small_digits():
    from vitbench.digits import DigitsConfig

    return DigitsConfig(train_size=60, val_size=30)
