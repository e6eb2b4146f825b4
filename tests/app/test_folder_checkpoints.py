"""--model/--weights: checkpoint formats, whole pickled models (only with --trust-weights), hostile pickles,
mismatches and unknown names, early and in one line."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from guided_swap.checks.demo import DemoCNN
from guided_swap.core.errors import CommandError
from guided_swap.app.model_spec import build, check

from hostile import WritesMarker, marker_written

FACTORY = "guided_swap.checks.demo:DemoCNN"


def trained() -> DemoCNN:
    torch.manual_seed(3)
    model = DemoCNN()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"module." + k: v for k, v in sd.items()},                  # DataParallel
    lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},               # torch.compile
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {"lr": 0.1}},
    # torchvision's reference scripts: the run's argparse.Namespace beside the weights
    lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                "lr_scheduler": {"last_epoch": 3}, "epoch": 3, "args": argparse.Namespace(lr=0.1, model="demo")},
    # timm's CheckpointSaver: arch, version, args, a metric (here a numpy scalar, as numpy metrics give)
    lambda sd: {"state_dict": sd, "arch": "demo", "epoch": 3, "version": 2, "args": argparse.Namespace(lr=0.1),
                "metric": np.float64(0.5), "best": np.int64(3), "state_dict_ema": sd},
], ids=["plain", "module-prefix", "compile-prefix", "model-wrapper", "state_dict-wrapper-and-prefix",
        "torchvision-reference", "timm-saver"])
def test_checkpoint_formats_load(tmp_path, wrap):
    model, path = trained(), str(tmp_path / "w.pt")
    torch.save(wrap(model.state_dict()), path)
    assert same_weights(build(check(FACTORY, path)), model)


def test_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    model, path = trained(), str(tmp_path / "w.safetensors")
    save_file(model.state_dict(), path)
    assert same_weights(build(check(FACTORY, path)), model)


def test_a_whole_pickled_model_loads_only_with_trust_weights(tmp_path):
    model, path = trained(), str(tmp_path / "whole.pt")
    torch.save(model, path)
    with pytest.raises(CommandError, match="unpickling it runs code from the file: pass --trust-weights"):
        check(None, path)
    said = []
    loaded = build(check(None, path, trust=True), say=said.append)
    assert type(loaded) is DemoCNN and same_weights(loaded, model) and not loaded.training
    assert "runs code from the file" in said[0]
    with pytest.raises(CommandError, match="weights_only=True\\) refuses.*--trust-weights"):
        build(check(FACTORY, path), say=said.append)  # with --model: read as a state dict, never unpickled
    with pytest.raises(CommandError, match="holds a whole pickled model .*leave out --model"):
        build(check(FACTORY, path, trust=True), say=said.append)


def test_a_whole_pickled_model_whose_class_is_gone_gets_one_line(tmp_path, monkeypatch):
    (tmp_path / "gone_module.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_module

    path = str(tmp_path / "whole.pt")
    torch.save(gone_module.Net(2, 2), path)
    monkeypatch.delitem(sys.modules, "gone_module")
    os.remove(tmp_path / "gone_module.py")
    with pytest.raises(CommandError) as caught:
        build(check(None, path, trust=True), say=lambda m: None)
    message = str(caught.value)
    assert "cannot be imported" in message and "gone_module" in message and "state_dict()" in message
    assert "\n" not in message


def test_a_hostile_checkpoint_is_never_unpickled_without_trust_weights(tmp_path):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "hostile.pt")
    torch.save({"state_dict": trained().state_dict(), "note": WritesMarker(marker)}, path)
    with pytest.raises(CommandError, match="holds pickled Python objects besides tensors .*--trust-weights"):
        build(check(FACTORY, path), say=lambda m: None)  # weights_only refuses it, and nothing retries
    with pytest.raises(CommandError, match="--trust-weights"):
        check(None, path)
    assert not marker_written(marker)
    said = []
    assert same_weights(build(check(FACTORY, path, trust=True), say=said.append), trained())
    assert marker_written(marker) and "--trust-weights was given" in said[0]  # the payload is live


def test_a_hostile_object_inside_an_allowed_container_is_still_refused(tmp_path):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "hostile.pt")
    torch.save({"state_dict": trained().state_dict(), "args": argparse.Namespace(note=WritesMarker(marker))}, path)
    with pytest.raises(CommandError, match="holds pickled Python objects besides tensors .*--trust-weights"):
        build(check(FACTORY, path), say=lambda m: None)
    assert not marker_written(marker)


@pytest.mark.parametrize("content", [b"hello\n", bytes(range(7, 107)), b"\x80\x02cos\nsystem\n"],
                         ids=["text", "bytes", "a pickle cut after a global"])
@pytest.mark.parametrize("trust", [False, True])
def test_a_file_that_is_no_checkpoint_is_a_usage_error_with_its_reason(tmp_path, content, trust):
    # the unpickler tripped over such bytes with a raw KeyError or IndexError, with or without --trust-weights
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CommandError, match=r"cannot read .*weights.pth. as a PyTorch checkpoint|--trust-weights"):
        build(check(FACTORY, str(path), trust=trust), say=lambda m: None)


def test_cli_refuses_a_hostile_whole_model_without_trust_weights(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.pt"
    torch.save(WritesMarker(str(marker)), path)
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    from skimage import data, io

    io.imsave(str(image), data.camera()[:64, :64], check_contrast=False)
    for model in ([], ["--model", FACTORY]):
        done = subprocess.run([sys.executable, "-m", "guided_swap", "explain", str(image.parent), *model, "--weights",
                               str(path), "--out", str(tmp_path / "out")], capture_output=True, text=True)
        assert done.returncode == 2 and "--trust-weights" in done.stderr, done.stderr
        assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["layers"], ["layers", FACTORY], ["export", "--shape", "1,3,32,32"],
                                     ["export", "--model", FACTORY, "--shape", "1,3,32,32"]],
                         ids=["layers", "layers-model", "export", "export-model"])
@pytest.mark.parametrize("content", ["whole", "state_dict"])
def test_layers_and_export_refuse_a_hostile_weights_file_without_trust_weights(tmp_path, capsys, command, content):
    from guided_swap.app.cli import main

    marker = str(tmp_path / "marker")
    path = str(tmp_path / "hostile.pt")
    hostile = WritesMarker(marker)
    torch.save(hostile if content == "whole" else {"state_dict": trained().state_dict(), "x": hostile}, path)
    out = ["--out", str(tmp_path / "o.pt2")] if command[0] == "export" else []
    assert main(command + ["--weights", path] + out) == 2 and "--trust-weights" in capsys.readouterr().err
    assert not marker_written(marker) and not (tmp_path / "o.pt2").exists()


def test_a_saved_explainer_given_as_weights_is_named(tmp_path):
    import guided_swap as gs

    path = str(tmp_path / "explainer.pt")  # a .gsx under another name
    gs.convert(trained(), layer="conv1").save(path)
    with pytest.raises(CommandError, match="is a saved guided_swap explainer .*gs.load"):
        build(check(FACTORY, path), say=lambda m: None)


def test_a_mismatch_names_the_first_missing_unexpected_and_misshapen_keys(tmp_path):
    state = trained().state_dict()
    state.pop("fc2.bias")
    state["head.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    path = str(tmp_path / "w.pt")
    torch.save(state, path)
    with pytest.raises(CommandError) as caught:
        build(check(FACTORY, path))
    message = str(caught.value)
    assert "1 missing key(s), first: fc2.bias" in message and "1 unexpected key(s), first: head.weight" in message
    assert "conv1.weight (file (16, 3, 3, 3), model (16, 1, 3, 3))" in message


def test_a_dict_without_a_state_dict_names_its_keys(tmp_path):
    path = str(tmp_path / "w.pt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CommandError, match="keys 'epoch', 'optimizer' but none holds a state dict"):
        build(check(FACTORY, path))


def test_unknown_names_and_missing_files_are_caught_before_building():
    with pytest.raises(CommandError, match=r"unknown model 'resnet19' \(did you mean resnet18"):
        check("resnet19")
    with pytest.raises(CommandError, match="no weights file at 'nope.pt'; .* or a torchvision weights name"):
        check("resnet18", "nope.pt")
    with pytest.raises(CommandError, match="no module named 'no_such_package'"):
        check("no_such_package.models:net")
    with pytest.raises(CommandError, match="--model is required"):
        check(None)


def test_torchvision_weights_names_bring_categories_and_preprocessing(tmp_path, monkeypatch):
    source = check("resnet18", "DEFAULT")
    assert source.weights == "ResNet18_Weights.IMAGENET1K_V1" and source.categories[:2] == ["tench", "goldfish"]
    assert (source.preprocessing.resize, source.preprocessing.crop) == (256, 224)
    assert check("resnet18", "ResNet18_Weights.IMAGENET1K_V1").weights == source.weights
    # offline: a file already in torch's hub cache is used as torchvision would use it
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    import torchvision

    torch.manual_seed(5)
    expected = torchvision.models.resnet18()
    torch.save(expected.state_dict(), tmp_path / "checkpoints" / os.path.basename(source.weights_url))
    assert same_weights(build(source), expected)


def test_cli_checkpoint_error_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, path)
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    from skimage import data, io

    io.imsave(str(image), data.camera()[:64, :64], check_contrast=False)
    done = subprocess.run([sys.executable, "-m", "guided_swap", "explain", str(image.parent), "--model", FACTORY,
                           "--weights", str(path), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "do not fit guided_swap.checks.demo:DemoCNN" in done.stderr and "first: conv1.weight" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written
