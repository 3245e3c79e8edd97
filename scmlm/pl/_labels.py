"""Point labels that never overlap: each label takes the nearest free place around its point (greedy, in order)."""

from __future__ import annotations

import numpy as np

#: Gap kept between two labels and around a label's point (display pixels at the figure's dpi).
PAD_PX = 1.5


def _candidates(height: float, width: float, n_steps: int = 14) -> list[tuple[float, float, str, str]]:
    """Offsets (pixels) and alignments around a point, nearest first: the four corners, then further out."""
    out = []
    for k in range(n_steps + 1):
        for j in range(4):
            dx = 2.0 + j * width / 2
            dy = 2.0 + k * (height + PAD_PX)
            out += [(dx, dy, "left", "bottom"), (-dx, dy, "right", "bottom")]
            out += [(dx, -dy, "left", "top"), (-dx, -dy, "right", "top")]
    out.sort(key=lambda c: np.hypot(c[0], c[1]))
    return out


def place_labels(ax, x, y, labels, *, fontsize: float = 7) -> list:
    """Label the points ``(x, y)`` of ``ax`` so that no two labels overlap and each stays inside the axes.

    Labels are placed in the given order (most important first), each at the free place nearest its point among
    candidates around it; a label moved away from its point gets a thin leader line; a label with no free place is
    left out (a crowded plot loses its least important labels rather than showing overlapping text). Call after the
    data and limits are set: the layout is settled first, and the labels take no part in it.

    Returns the placed annotations.
    """
    from matplotlib.text import Text

    fig = ax.get_figure()
    fig.canvas.draw()  # settle the (constrained) layout: the pixel positions below belong to it
    renderer = fig.canvas.get_renderer()
    area = ax.get_window_extent(renderer)
    to_points = 72.0 / fig.dpi
    placed, boxes = [], []
    for xi, yi, text in zip(x, y, labels, strict=True):
        ann = ax.annotate(str(text), (xi, yi), fontsize=fontsize, xytext=(0, 0), textcoords="offset points")
        ann.set_in_layout(False)
        ann.update_positions(renderer)
        size = Text.get_window_extent(ann, renderer)
        chosen = None
        for dx, dy, ha, va in _candidates(size.height, size.width):
            ann.set_position((dx * to_points, dy * to_points))
            ann.set_horizontalalignment(ha)
            ann.set_verticalalignment(va)
            ann.update_positions(renderer)  # an annotation places its text when drawn; measure it where it will be
            box = Text.get_window_extent(ann, renderer).padded(PAD_PX)
            inside = area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1
            if inside and not any(box.overlaps(b) for b in boxes):
                chosen = (dx, dy)
                boxes.append(box)
                break
        if chosen is None:
            ann.remove()
            continue
        if np.hypot(*chosen) > 12:  # far from its point: the same label with a leader line from its near corner
            ann.remove()
            relpos = (0.0 if chosen[0] > 0 else 1.0, 0.0 if chosen[1] > 0 else 1.0)
            ann = ax.annotate(
                str(text), (xi, yi), fontsize=fontsize, xytext=(chosen[0] * to_points, chosen[1] * to_points),
                textcoords="offset points", ha="left" if chosen[0] > 0 else "right",
                va="bottom" if chosen[1] > 0 else "top",
                arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.45", "shrinkA": 0, "shrinkB": 2,
                            "relpos": relpos},
            )  # fmt: skip
            ann.set_in_layout(False)
        placed.append(ann)
    return placed
