"""Life maps (Fig. 4) legible at normal size: the life panel wider than the others, one colour per whole block with
integer colorbar ticks, per-cell numbers at 7 pt on the 14 x 14 grid."""

import torch
import vitbench.figures

from liferegress import vis


def test_life_map_numbers_are_legible(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(vitbench.figures, "save", lambda fig, path, dpi: seen.setdefault("fig", fig) and path)
    torch.manual_seed(0)
    kept = tuple(torch.randint(0, 197, (1, n)) for n in (140, 100, 72))
    vis.plot_life_maps(torch.rand(1, 3, 112, 112), torch.rand(1, 197) * 10 + 3, kept, (14, 14), 4, 12, (4, 7, 10),
                       tmp_path / "l.png")
    fig = seen["fig"]
    life, image = fig.axes[1], fig.axes[0]
    assert life.get_position().width > 1.5 * image.get_position().width
    assert len(life.texts) == 196 and min(t.get_fontsize() for t in life.texts) >= 7
    bar = fig.axes[-1]
    assert [round(v) for v in bar.get_yticks()] == list(range(4, 13))
