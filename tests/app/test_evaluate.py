"""guided-swap evaluate: the metrics of a results folder, equal to gs.metrics on the saved arrays; tables and plot;
reruns skip what is done with the same settings; results of another model are refused."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from guided_swap.app import evaluate
from guided_swap.app.cli import main
from guided_swap.checks import demo, metrics

from test_folder import save_image

FAST = ("--percentiles", "30,70", "--steps", "4")


def run(*args) -> int:
    try:
        return main([*map(str, args)])
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A folder of demo results (two photographs, Grad-CAM and LayerCAM besides the pixel maps)."""
    folder = tmp_path_factory.mktemp("evaluate")
    save_image(folder / "in" / "cat.png", "chelsea")
    save_image(folder / "in" / "sub" / "astronaut.jpg", "astronaut")
    assert run("explain", folder / "in", "--model", "demo", "--cam", "layercam", "--save", "npz", "--out",
               folder / "maps", "--workers", "0", "--writers", "0") == 0
    return folder / "maps"


def test_evaluate_equals_the_metrics_on_the_saved_arrays(explained, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run("evaluate", explained, "--model", "demo", "--out", out, *FAST) == 0
    with np.load(explained / "sub" / "astronaut.jpg.npz") as data:
        x, target, cam, gradient = (torch.from_numpy(data[k]) for k in ("input", "target", "cam", "gradient"))
    saved = json.loads((out / "sub" / "astronaut.jpg.json").read_text())
    assert sorted(saved["maps"]) == ["cam", "cams.layercam", "gradient", "guided_gradcam"]
    ex = evaluate.explainer_for(demo.load_demo()[0], tuple(x.shape), torch.device("cpu"))
    x, target = x[None], target.view(1)
    for name, heat in (("cam", cam[None]), ("gradient", gradient.abs().amax(dim=0)[None])):
        values = saved["maps"][name]
        road = metrics.road(ex, x, heat, target, percentiles=(30, 70), generator=torch.Generator().manual_seed(0))
        assert values["road_combined"] == pytest.approx(float(road), rel=1e-5, abs=1e-7)
        low, high = heat.min(), heat.max()  # confidence change multiplies the input by the map scaled to [0, 1]
        change = metrics.confidence_change(ex, x, (heat - low) / (high - low), target)
        assert values["confidence_change"] == pytest.approx(float(change), rel=1e-5, abs=1e-7)
        assert float(heat.max()) != pytest.approx(1.0)  # the raw map is not in [0, 1]: the scaling matters
        assert values["deletion_curve"] == pytest.approx(metrics.deletion(ex, x, heat, target, steps=4)
                                                         .curve[0].tolist(), rel=1e-5, abs=1e-7)
        insertion = metrics.insertion(ex, x, heat, target, steps=4)
        assert values["insertion_auc"] == pytest.approx(float(insertion.auc), rel=1e-5, abs=1e-7)
    cat = json.loads((out / "cat.png.json").read_text())["maps"]  # the demo is sure of the astronaut whatever is kept
    assert len({round(cat[n]["road_morf"], 4) for n in cat}) > 1  # the maps are measured apart


def test_tables_per_map_a_summary_and_the_plot(explained, tmp_path):
    out = tmp_path / "eval"
    assert run("evaluate", explained, "--model", "demo", "--out", out, *FAST) == 0
    with open(out / "metrics.cam.csv", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert [row["result"] for row in table] == ["cat.png", "sub/astronaut.jpg"]
    assert set(table[0]) >= {"road_combined", "road_morf", "road_lerf", "drop_in_confidence", "deletion_auc",
                             "insertion_auc"}
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | 2 |" in summary for name in ("cam", "cams.layercam", "gradient", "guided_gradcam"))
    assert (out / "metrics.gradient.md").read_text().count("\n") == 4  # header, rule, two results
    from skimage import io

    picture = io.imread(str(out / "curves.png"))
    assert picture.shape[1] > picture.shape[0] and picture.std() > 10  # two panels, drawn


def test_rerun_skips_what_is_done_and_new_settings_evaluate_again(explained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    assert run("evaluate", explained, "--model", "demo", "--out", out, "--metrics", "deletion", *FAST) == 0
    first = (out / "cat.png.json").stat().st_mtime_ns
    measured = []
    original = evaluate.evaluate_batch
    monkeypatch.setattr(evaluate, "evaluate_batch", lambda *a: measured.append(len(a[1])) or original(*a))
    capsys.readouterr()
    assert run("evaluate", explained, "--model", "demo", "--out", out, "--metrics", "deletion", *FAST) == 0
    assert measured == [] and (out / "cat.png.json").stat().st_mtime_ns == first
    assert "2 of 2 result(s) already evaluated" in capsys.readouterr().out
    (out / "cat.png.json").unlink()  # as a run killed half-way leaves it
    assert run("evaluate", explained, "--model", "demo", "--out", out, "--metrics", "deletion", *FAST) == 0
    assert measured == [1]
    assert run("evaluate", explained, "--model", "demo", "--out", out, "--metrics", "deletion", "--steps", "3") == 0
    assert measured == [1, 2]
    assert len(json.loads((out / "cat.png.json").read_text())["maps"]["cam"]["deletion_curve"]) == 4
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporaries left


def test_results_of_another_model_and_empty_folders_are_refused(explained, tmp_path, capsys):
    assert run("evaluate", explained, "--model", "resnet18", "--out", tmp_path / "e") == 2
    assert "made by model 'demo'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run("evaluate", tmp_path / "empty", "--model", "demo") == 2
    assert "no guided-swap .npz results" in capsys.readouterr().err
    assert run("evaluate", explained, "--model", "demo", "--metrics", "roads") == 2
    assert "takes names of road,confidence,deletion,insertion" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_a_cam_with_a_flat_zero_region_gets_a_finite_road_with_ties_in_position_order(explained, tmp_path):
    """A trained model's Grad-CAM is zero over much of the image (the ReLU): at a percentile below that share,
    ROAD on the raw map keeps nothing (NaN). evaluate breaks the ties in position order, as deletion does."""
    import shutil

    folder = tmp_path / "maps"
    shutil.copytree(explained, folder)
    path = folder / "cat.png.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    cam = arrays["cam"].copy()
    cam[cam < np.quantile(cam, 0.4)] = 0  # 40% of the positions at 0
    np.savez(path, **{**arrays, "cam": cam})
    out = tmp_path / "eval"
    assert run("evaluate", folder, "--model", "demo", "--out", out, "--metrics", "road", "--percentiles", "20,70") == 0
    values = json.loads((out / "cat.png.json").read_text())["maps"]["cam"]
    ex = evaluate.explainer_for(demo.load_demo()[0], tuple(arrays["input"].shape), torch.device("cpu"))
    x, heat = torch.from_numpy(arrays["input"])[None], torch.from_numpy(cam)[None]
    target = torch.tensor([int(arrays["target"])])
    expected = metrics.road(ex, x, metrics.tie_broken(heat), target, percentiles=(20, 70),
                            generator=torch.Generator().manual_seed(0))
    assert np.isfinite(values["road_combined"]) and np.isfinite(values["road_morf"])
    assert values["road_combined"] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    with pytest.warns(RuntimeWarning, match="tie_broken"):
        assert bool(torch.isnan(metrics.road(ex, x, heat, target, percentiles=(20, 70), order="morf")))


def test_a_device_that_is_not_there_is_refused_before_any_work(explained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run("evaluate", explained, "--model", "demo", "--out", tmp_path / "e", "--device", "cuda:0") == 2
    assert "CUDA is not available here; use --device cpu" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert run("evaluate", explained, "--model", "demo", "--out", tmp_path / "e", "--device", "cuda:1") == 2
    assert "has 1 CUDA device(s), cuda:0 to cuda:0" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
