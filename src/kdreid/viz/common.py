"""What every picture shares: a matplotlib Figure drawn without pyplot (no global state, no display: the Agg
canvas renders straight to PNG bytes, so pictures work headless and from threads) and an atomic PNG write."""

from __future__ import annotations

import glob
import io
import re
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from kdreid.errors import KdreidError
from kdreid.rundir import atomic_write_bytes

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # an optional dependency: say how to get it rather than show a traceback
    raise KdreidError("pictures need matplotlib: pip install 'kdreid[viz]' (or pip install matplotlib)") from None

DPI = 100
# The colours of a correct and a wrong match: pure enough that a test can find them in the PNG's pixels.
CORRECT_RGB = (0, 170, 0)
WRONG_RGB = (220, 0, 0)
QUERY_RGB = (40, 40, 40)
# One colour per series, the same in every picture (matplotlib's default cycle, colour-blind friendlier than
# its older palette).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def new_figure(width: float, height: float) -> Figure:
    """A figure of width x height inches on an Agg canvas (never shown, only saved)."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def fitted_suptitle(figure: Figure, title: str, **options):
    """figure.suptitle(title, **options), the figure widened to hold it where it is narrower (a picture of one
    column: one target, a top-1 ranking, one image), rather than the title cut off at both ends."""
    heading = figure.suptitle(title, **options)
    needed = heading.get_window_extent(figure.canvas.get_renderer()).width / figure.dpi + 0.3
    if needed > figure.get_figwidth():
        figure.set_size_inches(needed, figure.get_figheight())
    return heading


def read_npz(path: str | Path, writer: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz that `writer` (e.g. "the adapt stage") saved for a picture; one line naming it when the
    file is missing or damaged (a truncated copy is not a zip file)."""
    path = Path(path)
    if not path.exists():
        raise KdreidError(f"{path} does not exist; {writer} writes it")
    try:
        if not zipfile.is_zipfile(path):  # cut short, a folder, or a single array (.npy) that np.load would return
            raise ValueError("not an .npz archive")
        with np.load(path) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise KdreidError(f"{path} is not a readable .npz ({error}); run {writer} again") from None


def count_non_finite(distances: Mapping) -> tuple[int, int]:
    """(NaN or infinite, all) distances of a loaded distance file: {name: array} (adapt) or {target: {name: array}}
    (distill); only float arrays are distances (not a distill file's `same` flags)."""
    arrays = [array for value in distances.values() for array in (value.values() if isinstance(value, Mapping)
                                                                  else [value])
              if np.issubdtype(np.asarray(array).dtype, np.floating)]
    return sum(int(np.count_nonzero(~np.isfinite(array))) for array in arrays), sum(np.size(a) for a in arrays)


def save_png(figure: Figure, path: str | Path) -> Path:
    """Render `figure` to `path` as PNG, atomically (a reader never sees half a picture)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def remove_pages(out_dir: str | Path, prefix: str) -> None:
    """Delete OUT_DIR/<prefix>_NN.png, the numbered pages an earlier drawing of `prefix` left, so that a folder
    never shows older pages beside new ones. Only this prefix's: another's may start with it (synth, synth_duke)."""
    page_name = re.compile(rf"{re.escape(prefix)}_\d+\.png")
    for old_page in Path(out_dir).glob(f"{glob.escape(prefix)}_*.png"):
        if page_name.fullmatch(old_page.name):
            old_page.unlink()
