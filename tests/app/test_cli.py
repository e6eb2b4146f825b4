"""The guided-swap command: help, one-line usage errors before any model is built, labels, methods that draw and
save only what they computed, the summary line and report, warnings, the other commands."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from skimage import io

from guided_swap.app import results
from guided_swap.core.cam import cam_methods
from guided_swap.app.cli import main
from guided_swap.app.results import read_index

from test_folder import save_image


def guided_swap(*args):
    return subprocess.run([sys.executable, "-m", "guided_swap", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "Agg"})


def run(*args) -> int:
    """main() in this process; argparse's usage errors give their exit code too."""
    try:
        return main([*map(str, args)])
    except SystemExit as stop:
        return stop.code


@pytest.fixture()
def two(tmp_path):
    save_image(tmp_path / "in" / "cat.png", "chelsea")
    save_image(tmp_path / "in" / "astronaut.jpg", "astronaut")
    return tmp_path / "in"


@pytest.fixture()
def figures(monkeypatch):
    """The panel titles of every figure written, by output path."""
    drawn = {}
    write = results.write_png

    def spy(fig, path, record):
        drawn[os.path.basename(path)] = [title for row in fig.titles for title in row]
        write(fig, path, record)

    monkeypatch.setattr(results, "write_png", spy)
    return drawn


@pytest.fixture()
def model_module(tmp_path, monkeypatch):
    """An importable module of tiny models: a GELU net (no ReLU) and one that warns while traced."""
    (tmp_path / "tiny_models.py").write_text(textwrap.dedent("""
        import warnings
        from torch import nn

        def gelu_net():
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 8, 3, padding=1), nn.GELU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

        class Chatty(nn.Sequential):
            def forward(self, x):
                warnings.warn("hello from the model's forward")
                return super().forward(x)

        def chatty():
            return Chatty(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def zero_head():  # as torchvision's ViT starts: every gradient is zero
            net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(4, 3))
            nn.init.zeros_(net[4].weight)
            return net

        def tiny_vit():  # 32 px, 8 px patches: a 4 x 4 grid behind one class token
            import timm, torch

            torch.manual_seed(0)
            return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_models"


def test_demo_writes_its_figure(tmp_path):
    done = guided_swap("demo", "--out", tmp_path / "demo")
    assert done.returncode == 0, done.stderr
    picture = io.imread(str(tmp_path / "demo" / "demo.png"))
    assert picture.ndim == 3 and picture.shape[0] > 1000 and picture.std() > 20


def test_python_m_guided_swap_help_explains_every_method_without_rst(capsys):
    done = guided_swap("explain", "--help")
    assert done.returncode == 0 and "`" not in done.stdout
    from guided_swap.app.cli import METHOD_HELP
    from guided_swap.app.folder import method_names

    for method in method_names():
        assert f"  {method:15s} {METHOD_HELP[method][:20]}" in done.stdout
    for promise in ("--force", "index.jsonl", "torchrun --nproc-per-node", "OUT/sub/cat.jpg.npz"):
        assert promise in done.stdout
    assert run("--help") == 0 and "`" not in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["missing/"], "no such file or folder: 'missing/'"),
    (["--size", "0"], "argument --size: must be 1 or more, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be 1 or more"),
    (["--size", "big"], "argument --size: takes a whole number, got 'big'"),
    (["--target", "cat"], "--target 'cat' is not a class index; a class name needs --labels"),
    (["--model", "resnet9000"], "unknown model 'resnet9000' (did you mean"),
    (["--save", "gif"], "argument --save: takes png, npz or png,npz"),
    (["--method", "guided", "--layer", "layer4"], "--layer is for the Grad-CAM methods"),
    (["--cmap", "jett"], "unknown colour map 'jett' (did you mean jet"),
    (["--std", "0,1,1"], "--std values must be positive"),
    (["--weights", "nope.pth"], "no weights file at 'nope.pth'"),
    (["--labels", "nope.txt"], "--labels: no labels file at 'nope.txt'"),
    (["--cam", "gradcam,gradcam+"], f"argument --cam: unknown CAM 'gradcam+'; the CAMs are {','.join(cam_methods())}"),
    (["--method", "guided", "--cam", "layercam"], "--cam is for the Grad-CAM methods"),
    (["--smooth", "0"], "argument --smooth: must be 1 or more, got 0"),
    (["--smooth", "4", "--noise", "-1"], "argument --noise: must be a finite number of 0 or more"),
    (["--noise", "0.1"], "--noise applies with --smooth N"),
])
def test_usage_errors_are_one_line_with_exit_2_before_the_model_is_built(tmp_path, two, capsys, args, message):
    inputs = [] if args[0] == "missing/" else [two]
    code = run("explain", *inputs, "--model", "resnet18", "--out", tmp_path / "out", *args)
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and message in error, error
    assert "random weights" not in error and not (tmp_path / "out").exists()  # no model was built, nothing written


def test_labels_name_the_classes_and_the_target(tmp_path, two, figures):
    labels = tmp_path / "labels.txt"
    labels.write_text("no face\na face\n")
    out = tmp_path / "out"
    assert run("explain", two, "--model", "demo", "--labels", labels, "--target", "a face", "--out", out,
               "--workers", "0", "--writers", "0") == 0
    for line in read_index(out):
        assert (line["target"], line["target_name"]) == (1, "a face")
        assert sorted(c["name"] for c in line["top5"]) == ["a face", "no face"]
    assert figures["cat.png.png"][0].startswith("a face: p=")
    labels.write_text("one\ntwo\nthree\n")
    assert run("explain", two, "--model", "demo", "--labels", labels, "--out", tmp_path / "o2") == 2


def test_torchvision_weights_bring_their_class_names(tmp_path, two, monkeypatch):
    import torch
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # offline: a cached file
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    out = tmp_path / "out"
    assert run("explain", two / "cat.png", "--model", "resnet18", "--weights", "DEFAULT", "--size", "64",
               "--method", "gradcam", "--out", out, "--workers", "0", "--writers", "0") == 0
    line = read_index(out)[0]
    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    assert line["target_name"] == categories[line["target"]] and line["settings"]["weights"].startswith("ResNet18")


def keys(path) -> set:
    with np.load(path) as maps:
        return set(maps.files)


def explain_demo(out, *args) -> int:
    return run("explain", *args, "--model", "demo", "--out", out, "--workers", "0", "--writers", "0")


def test_gradcam_draws_and_saves_only_grad_cam(tmp_path, two, figures):
    assert explain_demo(tmp_path / "out", two, "--method", "gradcam") == 0
    titles = figures["cat.png.png"]
    assert len(titles) == 2 and "Grad-CAM" in titles[1]  # the input, then Grad-CAM: nothing else was computed
    assert not [t for t in titles if "Guided" in t or "backprop" in t or "gradient" in t], titles
    assert keys(tmp_path / "out" / "cat.png.npz") == {"input", "logits", "target", "score", "cam", "cam_raw", "record"}


@pytest.mark.parametrize("method", ["all", "deconvnet"])
def test_every_panel_drawn_is_in_the_npz(tmp_path, two, figures, method):
    from guided_swap.app.writing import panels

    assert explain_demo(tmp_path / "out", two, "--method", method) == 0
    assert len(figures["cat.png.png"]) == len(panels(method))  # one titled axis per panel
    assert set(panels(method)) <= keys(tmp_path / "out" / "cat.png.npz")
    assert ("cam" in panels(method)) == (method == "all")


def test_save_chooses_the_files(tmp_path, two, capsys):
    out = tmp_path / "out"
    assert explain_demo(out, two, "--save", "png") == 0
    assert sorted(os.listdir(out)) == [results.MARKER, "astronaut.jpg.png", "cat.png.png", results.INDEX]
    assert run("explain", two, "--model", "demo", "--save", "png", "--out", out) == 0
    assert "2 of 2 input(s) already done" in capsys.readouterr().err  # the PNGs carry their settings
    assert explain_demo(tmp_path / "o2", two, "--save", "npz") == 0
    assert not [name for name in os.listdir(tmp_path / "o2") if name.endswith(".png")]


def test_summary_line_always_and_the_report_on_request(tmp_path, two, capsys):
    assert explain_demo(tmp_path / "out", two, "--report") == 0
    captured = capsys.readouterr()
    summary = [line for line in captured.err.splitlines() if "swapped" in line]
    assert len(summary) == 1 and summary[0].startswith("guided-swap: model demo: ")
    assert "rule guided: 4 rectifier call site(s) swapped; layer 'auto' captures node 'relu_'" in summary[0]
    assert "swapped 4 rectifier call site(s):" in captured.out and "layer 'auto' captures node" in captured.out


def test_a_model_without_relu_is_said_to_give_a_plain_gradient(tmp_path, two, capsys, model_module):
    assert run("explain", two / "cat.png", "--model", f"{model_module}:gelu_net", "--size", "32",
               "--out", tmp_path / "out", "--workers", "0", "--writers", "0") == 0
    error = capsys.readouterr().err
    summary = [line for line in error.splitlines() if "swapped" in line]
    assert len(summary) == 1 and "0 rectifier call site(s) swapped" in summary[0]
    assert "2 other activation(s) left alone (nn.GELU)" in summary[0]
    assert "no rectifier found, so the guided map is a plain gradient" in summary[0]


def show_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))  # as Python does


def test_library_warnings_reach_the_user_in_one_line(tmp_path, two, capsys, model_module):
    with warnings.catch_warnings():  # as outside pytest: warnings are shown, not recorded
        warnings.simplefilter("default")
        warnings.showwarning = show_on_stderr  # pytest's recorder would swallow them
        assert run("explain", two / "cat.png", "--model", f"{model_module}:chatty", "--size", "32",
                   "--out", tmp_path / "out", "--workers", "0", "--writers", "0") == 0
    error = capsys.readouterr().err
    assert "guided-swap: warning: UserWarning: hello from the model's forward\n" in error


def test_maps_that_show_nothing_are_named_once_by_file(tmp_path, two, capsys, model_module):
    """Not per batch with batch-local sample numbers (explain's warning): once, naming the inputs."""
    save_image(two / "coffee.png", "coffee")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show_on_stderr
        assert run("explain", two, "--model", f"{model_module}:zero_head", "--size", "32", "--batch-size", "2",
                   "--out", tmp_path / "out", "--save", "npz", "--workers", "0", "--writers", "0") == 0
    error = capsys.readouterr().err
    assert "ZeroGradientWarning" not in error and "sample(s)" not in error
    lines = [line for line in error.splitlines() if "zero everywhere" in line]
    assert lines == [line for line in lines if line.startswith(
        "guided-swap: warning: 3 of 3 result(s) hold a map that is zero everywhere (cam, gradient, guided_gradcam): "
        "astronaut.jpg, cat.png, coffee.png. Such a map shows nothing.")] and len(lines) == 1


def test_bad_layer_is_one_line(tmp_path, two, capsys):
    assert run("explain", two, "--model", "resnet18", "--layer", "layer9", "--out", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "layer 'layer9' is not in ResNet" in error and "layer4" in error


def test_layers_lists_names(capsys):
    assert run("layers", "resnet18") == 0
    out = capsys.readouterr().out
    assert "layer4.1.relu_1" in out and "  layer4\n" in out


def test_export_command(tmp_path, capsys):
    import torch

    path = tmp_path / "r18.pt2"
    assert run("export", "--model", "demo", "--layer", "auto", "--shape", "2,1,48,48", "--out", path) == 0
    assert os.listdir(tmp_path) == ["r18.pt2"]
    out = torch.export.load(str(path)).module()(torch.randn(3, 1, 48, 48), torch.tensor([0, 1, 1]))
    assert out["cam"].shape == (3, 48, 48)
    assert run("export", "--model", "demo", "--shape", "two", "--out", path) == 2
    assert "--shape" in capsys.readouterr().err


def test_mean_and_std_must_fit_the_channels(tmp_path, two, capsys):
    assert explain_demo(tmp_path / "out", two, "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2") == 2
    assert "the model takes 1 channel(s)" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert explain_demo(tmp_path / "out", two / "cat.png", "--mean", "0.5", "--std", "0.25", "--save", "npz") == 0
    with np.load(tmp_path / "out" / "cat.png.npz") as maps:
        assert json.loads(str(maps["record"]))["settings"]["mean"] == [0.5]


def test_cam_saves_draws_and_records_each_cam_by_its_name(tmp_path, two, figures, capsys):
    import torch

    from guided_swap import convert
    from guided_swap.checks.demo import load_demo

    out = tmp_path / "out"
    assert explain_demo(out, two, "--cam", "gradcam++,layercam,gradcam") == 0
    npz = out / "cat.png.npz"
    added = {f"{kind}.{cam}" for kind in ("cams", "cams_raw") for cam in ("gradcam++", "layercam", "gradcam")}
    assert keys(npz) == {"input", "logits", "target", "score", "gradient", "cam_raw", "cam", "guided_gradcam",
                         "record"} | added
    with np.load(npz) as maps:
        record = json.loads(str(maps["record"]))
        assert record["settings"]["cams"] == ["gradcam++", "layercam", "gradcam"]
        explanation = convert(load_demo()[0], layer="auto").explain(torch.from_numpy(maps["input"][None]),
                                                                    int(maps["target"]))
        for cam in ("gradcam++", "layercam"):
            assert maps[f"cams_raw.{cam}"].shape == (12, 12) and maps[f"cams.{cam}"].shape == (48, 48)
            assert maps[f"cams.{cam}"].max() > 0  # not an empty map
            np.testing.assert_allclose(maps[f"cams.{cam}"], explanation.cams[cam][0].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(maps["cams.gradcam"], maps["cam"])
        assert not np.allclose(maps["cams.gradcam++"] / maps["cams.gradcam++"].max(), maps["cam"] / maps["cam"].max())
    titles = figures["cat.png.png"]
    assert titles[1:] == ["guided backprop", "Grad-CAM (relu_)", "Guided Grad-CAM", "Grad-CAM++ (relu_)",
                          "LayerCAM (relu_)"]  # Grad-CAM once: --cam gradcam is the Grad-CAM panel
    capsys.readouterr()
    assert explain_demo(out, two) == 2  # other settings: refused, nothing replaced
    assert "cams ['gradcam++', 'layercam', 'gradcam'] -> []" in capsys.readouterr().err


def test_gradcam_with_cam_draws_only_the_cams_computed(tmp_path, two, figures):
    assert explain_demo(tmp_path / "out", two / "cat.png", "--method", "gradcam", "--cam", "hirescam") == 0
    assert figures["cat.png.png"][1:] == ["Grad-CAM (relu_)", "HiResCAM (relu_)"]
    assert "gradient" not in keys(tmp_path / "out" / "cat.png.npz")


def test_smooth_is_the_mean_over_seeded_noisy_copies(tmp_path, two, figures):
    import torch

    from guided_swap import convert
    from guided_swap.checks.demo import load_demo
    from guided_swap.app.writing import SMOOTHING_SEED

    out = tmp_path / "out"
    assert explain_demo(out, two / "cat.png", "--smooth", "3", "--noise", "0.1", "--cam", "layercam") == 0
    with np.load(out / "cat.png.npz") as maps:
        settings = json.loads(str(maps["record"]))["settings"]
        x, target, gradient, layercam = (torch.from_numpy(maps[k]) for k in ("input", "target", "gradient",
                                                                             "cams_raw.layercam"))
    assert settings["smooth"] == {"copies": 3, "noise": 0.1, "seed": SMOOTHING_SEED}
    # by hand: three copies, noise 0.1 of the input's range, drawn as the CLI documents, explained unsmoothed
    generator = torch.Generator().manual_seed(SMOOTHING_SEED)
    noise = torch.stack([torch.randn(x.shape, generator=generator) for _ in range(3)])
    copies = x + 0.1 * (x.max() - x.min()) * noise
    plain = convert(load_demo()[0], layer="auto").explain(copies, target.repeat(3))
    torch.testing.assert_close(gradient, plain.gradient.mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layercam, plain.cams_raw["layercam"].mean(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(gradient, plain.gradient[0], rtol=1e-2)  # a mean, not one copy
    assert all(title.endswith("SmoothGrad: 3 copies, noise 0.1") for title in figures["cat.png.png"][1:])


def test_a_vit_gives_a_patch_grid_grad_cam(tmp_path, two, model_module):
    """`auto` on a ViT takes the input of the last attention; the map is on the 4 x 4 patch grid and equals
    Grad-CAM by plain hooks with the class token dropped and the tokens reshaped."""
    import importlib

    import torch

    out = tmp_path / "out"
    assert run("explain", two / "cat.png", "--model", f"{model_module}:tiny_vit", "--size", "32", "--cam",
               "layercam", "--save", "npz", "--out", out, "--workers", "0", "--writers", "0") == 0
    with np.load(out / "cat.png.npz") as maps:
        record = json.loads(str(maps["record"]))
        x, target, cam_raw = torch.from_numpy(maps["input"][None]), int(maps["target"]), maps["cam_raw"]
        assert maps["cam"].shape == maps["cams.layercam"].shape == (32, 32)
    assert cam_raw.shape == (4, 4) and cam_raw.max() > 0 and record["layers"]["auto"].startswith("blocks.1.norm1")
    model = getattr(importlib.import_module(model_module), "tiny_vit")().eval()
    seen = {}
    hook = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: seen.update(a=o) or o.retain_grad())
    model(x)[0, target].backward()
    hook.remove()
    tokens, grads = seen["a"][:, 1:].detach(), seen["a"].grad[:, 1:]
    expected = torch.relu((grads.mean(1, keepdim=True) * tokens).sum(-1)).reshape(4, 4)
    np.testing.assert_allclose(cam_raw, expected.numpy(), rtol=1e-4, atol=1e-6 * float(expected.max()))
