"""The sanity checks: metric maths, cascading randomisation on the trained demo CNN, planted evidence."""
import os

import numpy as np
import pytest
import torch

from guided_swap.checks import demo, sanity
from guided_swap.media import viz


def test_similarity_metrics_on_values():
    a = np.arange(16.0).reshape(4, 4)
    assert sanity.spearman(a, a) == pytest.approx(1.0)
    assert sanity.spearman(a, -a) == pytest.approx(-1.0)
    assert sanity.spearman(a, np.ones((4, 4))) == 0.0
    assert sanity.ssim(a, a * 3 + 1) == pytest.approx(1.0)  # min-max normalised first
    assert sanity.ssim(a, np.random.default_rng(0).random((4, 4))) < 0.9


@pytest.fixture(scope="module")
def cascade():
    model, x, _ = demo.load_demo()
    return sanity.model_randomization(model, x[:4], max_steps=3)


def test_cascade_table_shape_and_identity_step(cascade):
    assert len(cascade) == 4 * len(sanity.methods())
    assert {r["randomized"] for r in cascade} == {"none", "fc2", "fc1", "bn3"}
    for row in cascade:
        assert -1.0 <= row["spearman"] <= 1.0 and -1.0 <= row["ssim"] <= 1.0
        if row["step"] == 0:
            assert row["ssim"] == pytest.approx(1.0) and row["spearman"] == pytest.approx(1.0)


def test_guided_backprop_is_less_sensitive_to_the_head_than_gradcam(cascade):
    """Adebayo et al.'s finding, measured on our trained demo CNN: randomising the top layer barely changes
    guided backprop but destroys Grad-CAM."""
    first = {r["method"]: r for r in cascade if r["step"] == 1}
    assert first["guided"]["spearman"] > 0.7
    assert first["gradcam"]["spearman"] < first["guided"]["spearman"] - 0.5


def test_model_randomization_does_not_touch_the_model():
    model, x, _ = demo.load_demo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sanity.model_randomization(model, x[:2], max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_data_randomization_against_an_untrained_model():
    model, x, _ = demo.load_demo()
    torch.manual_seed(0)
    rows = sanity.data_randomization(model, demo.DemoCNN().eval(), x[:2])
    assert {r["method"] for r in rows} == set(sanity.methods())


def test_planted_evidence_dataset():
    images, labels, boxes = sanity.planted_dataset(20, size=48, seed=3)
    assert images.shape == (20, 1, 48, 48) and labels.tolist() == [0, 1] * 10
    assert (boxes[labels == 0] == -1).all() and (boxes[labels == 1][:, 2] - boxes[labels == 1][:, 0] == 7).all()
    for image, box in zip(images[labels == 1], boxes[labels == 1]):
        top, left, bottom, right = box.tolist()
        patch = image[0, top:bottom, left:right]
        assert (patch[3, :] == 1).all() and (patch[:, 3] == 1).all()  # the cross is where the box says


def test_gradcam_points_at_planted_evidence():
    model, accuracy = sanity.train_planted(n=320, epochs=15)  # 0.97 held out, pointing 1.0 (seeded)
    assert accuracy >= 0.9
    images, labels, boxes = sanity.planted_dataset(100, seed=2000)
    result = sanity.localization(model, (images - 0.5) / 0.25, boxes, labels)
    assert result["gradcam"]["pointing"] >= 0.9
    assert result["gradcam"]["images"] == 50
    assert 0 <= result["guided"]["energy_in_box"] <= 1


# --- The sanity report's markdown is written atomically: a failing write leaves the previous report intact and no

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
