"""``results.write_png`` saves a ``matplotlib.figure.Figure`` with its own canvas: no pyplot, atomically."""
import os
import sys

import pytest
from matplotlib.figure import Figure

from guided_swap import results


def _figure() -> Figure:
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def test_write_png_needs_no_pyplot(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any `import matplotlib.pyplot` now fails
    path = str(tmp_path / "a.png")
    results.write_png(_figure(), path, {"settings": {"rule": "guided"}})
    assert results.read_record(path) == {"settings": {"rule": "guided"}}
    assert os.listdir(tmp_path) == ["a.png"]


def test_a_failing_png_write_leaves_no_file(tmp_path):
    fig = _figure()

    def half_written(stream, **options):
        stream.write(b"\x89PNG half a file")
        raise RuntimeError("the disk is full")

    fig.savefig = half_written
    with pytest.raises(RuntimeError, match="disk is full"):
        results.write_png(fig, str(tmp_path / "a.png"), {})
    assert os.listdir(tmp_path) == []
