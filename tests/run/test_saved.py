"""Save/load of the converted explainer: round trip, a process without the model's class, damaged files."""
import os
import subprocess
import sys
import textwrap
import types
import zipfile

import pytest
import torch
from torch import nn

import guided_swap as gs
from guided_swap.run import saved
from guided_swap import convert_runtime

from conftest import image_batch, make_model
from models import EverySpelling

MODEL_SOURCE = textwrap.dedent('''
    import torch, torch.nn as nn, torch.nn.functional as F

    class PrivateNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = F.relu(self.conv1(x), inplace=True)
            x = self.conv2(x).relu_()
            return self.head(torch.relu(x).mean(dim=(2, 3)))
''')


def test_round_trip_keeps_everything(tmp_path):
    model = make_model("densenet121")
    ex = gs.convert(model, layer="features")
    path = tmp_path / "densenet.gsx"
    ex.save(str(path))
    loaded = gs.load(str(path))
    assert loaded.swapped == ex.swapped and loaded.layers == ex.layers and loaded.rule == ex.rule
    assert loaded.forked and str(loaded.report) == str(ex.report)
    x = image_batch(64)
    a, b = ex.explain(x, [1, 2]), loaded.explain(x, [1, 2])
    assert torch.equal(a.gradient, b.gradient) and torch.equal(a.cam, b.cam)
    assert saved.read_header(str(path))["guided_swap_version"] == gs.__version__


def test_loads_where_the_model_class_is_not_importable(tmp_path):
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    (source_dir / "private_model.py").write_text(MODEL_SOURCE)
    sys.path.insert(0, str(source_dir))
    try:
        import private_model

        torch.manual_seed(0)
        model = private_model.PrivateNet().eval()
    finally:
        sys.path.remove(str(source_dir))
        sys.modules.pop("private_model", None)
    ex = gs.convert(model, layer="conv2")
    assert len(ex.swapped) == 3
    path, data = tmp_path / "private.gsx", tmp_path / "data.pt"
    ex.save(str(path))
    x = image_batch(16)
    e = ex.explain(x, [1, 3])
    torch.save({"x": x, "gradient": e.gradient, "cam": e.cam}, data)
    (source_dir / "private_model.py").unlink()  # the defining module is gone
    script = textwrap.dedent(f'''
        import torch, guided_swap as gs
        try:
            import private_model
            raise SystemExit("the model module should not be importable here")
        except ModuleNotFoundError:
            pass
        d = torch.load({str(data)!r})
        e = gs.load({str(path)!r}).explain(d["x"], [1, 3])
        assert torch.equal(e.gradient, d["gradient"]) and torch.equal(e.cam, d["cam"])
        print("OK")
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr


def test_damaged_and_foreign_files_get_clear_errors(tmp_path):
    ex = gs.convert(make_model("resnet18"), layer="layer4")
    good = tmp_path / "good.gsx"
    ex.save(str(good))
    truncated = tmp_path / "truncated.gsx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(gs.LoadError, match="truncated"):
        gs.load(str(truncated))
    garbage = tmp_path / "garbage.gsx"
    garbage.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(gs.LoadError, match="corrupt"):
        gs.load(str(garbage))
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(gs.LoadError, match="not a guided_swap explainer"):
        gs.load(str(other))
    weights = tmp_path / "weights.pt"
    torch.save(make_model("resnet18").state_dict(), weights)
    with pytest.raises(gs.LoadError):
        gs.load(str(weights))
    with pytest.raises(FileNotFoundError):
        gs.load(str(tmp_path / "missing.gsx"))


def test_incompatible_version_is_refused(tmp_path):
    ex = gs.convert(make_model("resnet18"), layer="layer4")
    path = tmp_path / "old.gsx"
    ex.save(str(path))
    newer = tmp_path / "newer.gsx"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(newer, "w") as target:
        header = source.read(saved.HEADER).replace(f'"format_version": {saved.FORMAT_VERSION}'.encode(), b'"format_version": 99')
        target.writestr(saved.HEADER, header)
        target.writestr(saved.PAYLOAD, source.read(saved.PAYLOAD))
    with pytest.raises(gs.LoadError, match="format 99"):
        gs.load(str(newer))


# --- Saving a run-time explainer: it holds its copy of the model, so it saves and loads where the model's classes

def test_a_runtime_explainer_saves_and_loads_with_its_model_classes(tmp_path):
    torch.manual_seed(0)
    ex = convert_runtime(EverySpelling().eval(), layer="conv2")
    x = torch.randn(2, 3, 16, 16)
    path = str(tmp_path / "r.gsx")
    ex.save(path)
    loaded = gs.load(path)
    assert loaded.report.capture == "runtime"
    assert torch.equal(loaded.explain(x, [0, 1]).gradient, ex.explain(x, [0, 1]).gradient)


def test_a_model_class_defined_in_a_function_is_refused_before_writing(tmp_path):
    class LocalNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x)).mean(dim=(2, 3))

    ex = convert_runtime(LocalNet().eval(), layer="conv")
    with pytest.raises(TypeError, match=r"captured at run time .*LocalNet.* cannot be imported by name"):
        ex.save(str(tmp_path / "r.gsx"))
    assert os.listdir(tmp_path) == []


def test_loading_without_the_model_class_says_what_is_missing(tmp_path, monkeypatch):
    module = types.ModuleType("gs_fixes_vanishing_models")
    exec("from torch import nn\n"
         "class VanishingNet(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.conv = nn.Conv2d(3, 2, 3)\n"
         "    def forward(self, x):\n"
         "        return self.conv(x).relu().mean(dim=(2, 3))\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = str(tmp_path / "r.gsx")
    convert_runtime(module.VanishingNet().eval(), layer="conv").save(path)
    monkeypatch.delitem(sys.modules, module.__name__)
    with pytest.raises(gs.LoadError, match="captured at run time the model's own classes"):
        gs.load(path)
