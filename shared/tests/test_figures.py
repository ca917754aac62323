import pytest

from vitbench import figures


@pytest.mark.parametrize("unit", ["image", "clip"])
def test_accuracy_vs_gflops_names_its_unit(tmp_path, monkeypatch, unit):
    seen = {}
    monkeypatch.setattr(figures, "save", lambda fig, path, dpi: seen.setdefault("axes", fig.axes[0]) and path)
    rows = [{"series": "dense", "method": "dense", "point": "", "top1": 80.0, "gflops": 4.6},
            {"series": "ATS", "method": "ats", "point": "rho 1", "top1": 79.0, "gflops": 3.0},
            {"series": "ATS", "method": "ats", "point": "rho 0.8", "top1": None, "gflops": 2.5}]
    figures.accuracy_vs_gflops(rows, tmp_path / "a.png", "title", unit)
    ax = seen["axes"]
    assert ax.get_xlabel().startswith(f"GFLOPs per {unit} ")
    assert [line.get_label() for line in ax.get_lines()] == ["dense", "ATS"]
    assert list(ax.get_lines()[1].get_xdata()) == [3.0]  # the point without an accuracy is left out
