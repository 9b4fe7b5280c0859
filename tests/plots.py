"""What a written figure must show: decoded PNG of the expected size with every plotted line's colour."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image


def assert_plot(path: Path, size: tuple[int, int], lines: int) -> None:
    """``path`` decodes to a ``size`` (width, height) image in which each of the first ``lines`` colours of
    matplotlib's default cycle covers at least 20 pixels (each line measured at 100 or more)."""
    with Image.open(path) as image:
        assert image.size == size, (path.name, image.size)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    for colour in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][:lines]:
        rgb = np.array(matplotlib.colors.to_rgb(colour)) * 255
        count = int((pixels == rgb.round()).all(axis=1).sum())
        assert count >= 20, (path.name, colour, count)
