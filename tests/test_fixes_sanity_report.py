"""The sanity report's markdown is written atomically: a failing write leaves the previous report intact and no
partial or temporary file behind."""
import os

import pytest
import torch

from guided_swap import demo, sanity, viz


@pytest.fixture
def cheap_report(monkeypatch):
    """``sanity.report`` with every check replaced by a constant (the writing is what is tested)."""
    x = torch.zeros(1, 3, 8, 8)
    monkeypatch.setattr(demo, "load_demo", lambda: (None, x, None))
    monkeypatch.setattr(viz, "save_png", lambda figure, path: path)
    monkeypatch.setattr(sanity, "randomization_figure", lambda model, x: None)
    monkeypatch.setattr(sanity, "model_randomization", lambda model, x: [])
    monkeypatch.setattr(sanity, "train_planted", lambda: (None, 0.5))
    monkeypatch.setattr(sanity, "planted_dataset", lambda n, seed: (torch.zeros(2, 1, 8, 8), torch.ones(2), None))
    monkeypatch.setattr(sanity, "localization", lambda *args: {"guided": {"pointing": 1.0, "energy_in_box": 0.5}})


def test_report_writes_the_markdown(cheap_report, monkeypatch, tmp_path):
    monkeypatch.setattr(sanity, "table_markdown", lambda rows: "| table |")
    path = sanity.report(str(tmp_path))
    text = open(path, encoding="utf-8").read()
    assert "| table |" in text and "| guided | 1.000 | 0.500 |" in text
    assert os.listdir(tmp_path) == ["sanity_results.md"]


def test_a_failing_write_leaves_the_previous_report_and_no_partial_file(cheap_report, monkeypatch, tmp_path):
    previous = tmp_path / "sanity_results.md"
    previous.write_text("previous report", encoding="utf-8")
    monkeypatch.setattr(sanity, "table_markdown", lambda rows: "\ud800")  # a lone surrogate: UTF-8 cannot encode it
    with pytest.raises(UnicodeEncodeError):
        sanity.report(str(tmp_path))
    assert previous.read_text(encoding="utf-8") == "previous report"
    assert os.listdir(tmp_path) == ["sanity_results.md"]
