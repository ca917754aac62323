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


def test_labels_of_coinciding_points_do_not_overlap_and_the_axis_spans_two_points(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(figures, "save", lambda fig, path, dpi: seen.setdefault("axes", fig.axes[0]) and path)
    rows = [{"series": "dense", "method": "dense", "point": "", "top1": 93.70, "gflops": 0.180},
            {"series": "LR", "method": "lr", "point": "rho 0.9", "top1": 93.50, "gflops": 0.150},
            {"series": "LR ft", "method": "lr", "point": "rho 0.9", "top1": 93.50, "gflops": 0.150},
            {"series": "LR", "method": "lr", "point": "rho 0.7", "top1": 93.35, "gflops": 0.118}]
    figures.accuracy_vs_gflops(rows, tmp_path / "a.png", "title")
    ax = seen["axes"]
    lo, hi = ax.get_ylim()
    assert hi - lo >= figures.MIN_TOP1_SPAN  # 0.35 points between the rows must not fill the axis
    offsets = {(t.get_text(), t.xyann) for t in ax.texts}
    assert len(offsets) == 3 and len({o for _, o in offsets}) >= 2  # the two "rho 0.9" labels apart


def test_label_offsets_only_move_labels_that_collide():
    assert figures.label_offsets([(0, 0), (10, 10), (0, 0), (0.1, 0.1)], (10, 10)) == [
        (4, 4), (4, 4), (4, -10), (4, 14)]
