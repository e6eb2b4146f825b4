"""Save/load of the converted explainer: round trip, a process without the model's class, damaged files."""
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import guided_swap as gs

from conftest import image_batch, make_model

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
    assert gs.io.read_header(str(path))["guided_swap_version"] == gs.__version__


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
        header = source.read(gs.io.HEADER).replace(f'"format_version": {gs.io.FORMAT_VERSION}'.encode(), b'"format_version": 99')
        target.writestr(gs.io.HEADER, header)
        target.writestr(gs.io.PAYLOAD, source.read(gs.io.PAYLOAD))
    with pytest.raises(gs.LoadError, match="format 99"):
        gs.load(str(newer))
