"""The guided-swap command end to end, in subprocesses: demo, explain a folder (and rerun), bad inputs."""
import os
import subprocess
import sys

import numpy as np
import pytest
from skimage import data, io


def guided_swap(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "guided_swap.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "MPLBACKEND": "Agg"})


def test_demo_writes_its_figure(tmp_path):
    done = guided_swap("demo", "--out", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr
    picture = io.imread(str(tmp_path / "demo" / "demo.png"))
    assert picture.ndim == 3 and picture.shape[0] > 1000 and picture.std() > 20


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    io.imsave(str(root / "cat.png"), data.chelsea())
    io.imsave(str(root / "nested" / "astronaut.jpg"), data.astronaut())
    io.imsave(str(root / "grey16.png"), (data.camera().astype(np.uint16) * 257), check_contrast=False)
    return root


def test_explain_a_folder_then_rerun_skips_done_images(tmp_path, folder):
    out = tmp_path / "maps"
    done = guided_swap("explain", str(folder), "--model", "resnet18", "--layer", "layer4", "--size", "64",
                       "--resize", "72", "--batch-size", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    names = sorted(os.listdir(out))
    assert names == ["cat.npz", "cat.png", "grey16.npz", "grey16.png", "nested__astronaut.npz", "nested__astronaut.png"]
    maps = np.load(out / "cat.npz")
    assert maps["gradient"].shape == (3, 64, 64) and maps["cam"].shape == (64, 64)
    assert maps["guided_gradcam"].shape == (3, 64, 64) and int(maps["target"]) == int(maps["logits"].argmax())
    before = {name: os.path.getmtime(out / name) for name in names}
    again = guided_swap("explain", str(folder), "--model", "resnet18", "--layer", "layer4", "--size", "64",
                        "--resize", "72", "--out", str(out))
    assert again.returncode == 0 and "3 image(s) already done" in again.stderr
    assert before == {name: os.path.getmtime(out / name) for name in names}


def test_bad_file_is_reported_and_the_rest_explained(tmp_path, folder):
    (folder / "broken.png").write_bytes(b"this is not a png")
    done = guided_swap("explain", str(folder), "--model", "resnet18", "--method", "guided", "--size", "32",
                       "--resize", "32", "--out", str(tmp_path / "maps"))
    assert done.returncode == 1
    assert "skipped" in done.stderr and "broken.png" in done.stderr and "Traceback" not in done.stderr
    assert len([n for n in os.listdir(tmp_path / "maps") if n.endswith(".npz")]) == 3


def test_bad_layer_and_bad_model_are_one_line_errors(tmp_path, folder):
    done = guided_swap("explain", str(folder), "--model", "resnet18", "--layer", "layer9", "--out", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "layer 'layer9' is not in ResNet" in done.stderr and "layer4" in done.stderr
    done = guided_swap("explain", str(folder), "--model", "resnet9000", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown model" in done.stderr
    done = guided_swap("explain", str(tmp_path / "missing.png"), "--model", "resnet18", "--out", str(tmp_path))
    assert done.returncode == 1 and "no image file" in done.stderr


def test_layers_lists_names():
    done = guided_swap("layers", "resnet18")
    assert done.returncode == 0 and "layer4.1.relu_1" in done.stdout and "  layer4\n" in done.stdout


def test_export_command(tmp_path):
    path = tmp_path / "r18.pt2"
    done = guided_swap("export", "--model", "demo", "--layer", "auto", "--shape", "2,1,48,48", "--out", str(path))
    assert done.returncode == 0, done.stderr
    import torch

    out = torch.export.load(str(path)).module()(torch.randn(3, 1, 48, 48), torch.tensor([0, 1, 1]))
    assert out["cam"].shape == (3, 48, 48)
    done = guided_swap("export", "--model", "demo", "--shape", "two", "--out", str(path))
    assert done.returncode == 2 and "--shape" in done.stderr
