"""Save/load of the converted explainer: round trip, bit-exact maps on the zoo, a process without the model's
class, damaged and edited files, what needs trust=True, the old pickled format."""
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

from conftest import image_batch, make_model, randomise_batchnorm, small_densenet
from hostile import forge, parts
from models import EverySpelling
from untraceable_models import ShapeAssertNet

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
    with pytest.raises(gs.LoadError, match="is a PyTorch checkpoint .*torch.save.*not a saved explainer") as refused:
        gs.load(str(weights))
    assert "torch.export.load" not in str(refused.value)  # no advice to unpickle it
    program = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(nn.ReLU(), (torch.randn(2),)), str(program))
    with pytest.raises(gs.LoadError, match=r"is a torch.export program \(.pt2\).*trusts the file"):
        gs.load(str(program))
    with pytest.raises(FileNotFoundError):
        gs.load(str(tmp_path / "missing.gsx"))


def test_incompatible_version_is_refused(tmp_path):
    ex = gs.convert(make_model("resnet18"), layer="layer4")
    path = tmp_path / "old.gsx"
    ex.save(str(path))
    newer = tmp_path / "newer.gsx"
    forge(path, newer, header=lambda h: h.update(format_version=99))
    with pytest.raises(gs.LoadError, match="format 99"):
        gs.load(str(newer))


# --- Bit-exact on the zoo, and fast -----------------------------------------------------------------------

def _vgg_small_head():
    model = make_model("vgg11")
    torch.manual_seed(1)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))
    return model.eval()


def _timm(name, **options):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomise_batchnorm(timm.create_model(name, pretrained=False, **options)).eval()


def _small_swin():
    """torchvision's Swin code (its fx-wrapped attention and padding functions) at a small size."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=10).eval()


ZOO = {  # name: (model, input size, convert options)
    "resnet18": (lambda: make_model("resnet18"), 48, {}),
    "densenet": (small_densenet, 48, {}),
    "vgg11": (_vgg_small_head, 48, {}),
    "mobilenet_v3_small": (lambda: make_model("mobilenet_v3_small"), 48, {}),
    "efficientnet_b0": (lambda: make_model("efficientnet_b0"), 48, {}),
    "googlenet": (lambda: make_model("googlenet"), 48, {}),
    "inception_v3": (lambda: make_model("inception_v3"), 80, {}),
    "timm_mobilenetv3": (lambda: _timm("mobilenetv3_small_050"), 64, {}),
    "timm_vit": (lambda: _timm("vit_tiny_patch16_224", img_size=32, depth=2), 32, {}),  # fx's _assert_is_none
    "swin": (_small_swin, 32, {}),
    "export_shape_assert": (lambda: ShapeAssertNet().eval(), 48, {"capture": "export"}),
}


@pytest.mark.filterwarnings("ignore:no ReLU was found")  # efficientnet: SiLU only, the graph is what counts
@pytest.mark.parametrize("name", list(ZOO))
def test_a_loaded_explainer_gives_the_same_maps_bit_for_bit(name, tmp_path):
    build, size, options = ZOO[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    ex = gs.convert(build(), layer="auto", example_input=x[:1], **options)
    path = str(tmp_path / f"{name}.gsx")
    ex.save(path)
    assert saved.read_header(path)["needs_trust"] == []  # data only: loads without unpickling
    assert saved.PICKLED not in parts(path)
    loaded = gs.load(path)
    assert loaded.report.capture == ex.report.capture == ("export" if options else "fx")
    a, b = ex.explain(x), loaded.explain(x)  # each sample's top class
    assert a.gradient.abs().sum() > 0 and a.cam_raw.abs().sum() > 0  # not vacuous
    for key in ("logits", "gradient", "cam_raw", "cam", "guided_gradcam"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert str(loaded.report) == str(ex.report) and loaded.swapped == ex.swapped
    assert torch.equal(loaded(x), ex(x))


def test_loading_moves_the_weights_where_map_location_says(tmp_path):
    ex = gs.convert(make_model("resnet18"), layer="layer4")
    path = str(tmp_path / "r.gsx")
    ex.save(path)
    loaded = gs.load(path, map_location={"cpu": "meta"})
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
    with pytest.raises(TypeError, match="map_location"):
        gs.load(path, map_location=lambda storage, location: storage)


# --- Edited and damaged files: a LoadError, never a wrong explainer -------------------------------------------

@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.gsx"
    gs.convert(make_model("resnet18"), layer="layer4").save(str(path))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(layers=["layer3"]), "header does not match its contents .*layers"),
    (lambda h: h.update(rule="deconvnet"), "header does not match its contents .*rule"),
    (lambda h: h.update(swapped=3), "header does not match its contents .*swapped"),
    (lambda h: h.pop("parts"), "does not list its parts"),
])
def test_an_edited_header_is_refused(good_file, tmp_path, edit, message):
    edited = tmp_path / "edited.gsx"
    forge(good_file, edited, header=edit)
    with pytest.raises(gs.LoadError, match=message):
        gs.load(str(edited))


def test_a_part_changed_after_saving_fails_its_checksum(good_file, tmp_path):
    description = parts(good_file)[saved.DESCRIPTION].replace(b'"layer4"', b'"layer3"')
    edited = tmp_path / "edited.gsx"
    with zipfile.ZipFile(good_file) as source, zipfile.ZipFile(edited, "w") as target:
        for name in source.namelist():
            target.writestr(name, description if name == saved.DESCRIPTION else source.read(name))
    with pytest.raises(gs.LoadError, match="explainer.json is not the part its header was written with"):
        gs.load(str(edited))


def _with_tensors(path, change):
    from safetensors.torch import load, save

    tensors = load(parts(path)[saved.TENSORS])
    change(tensors)
    return {saved.TENSORS: save(tensors)}


def test_tensors_swapped_or_resized_are_refused_even_with_matching_checksums(good_file, tmp_path):
    # safetensors hands the tensors back in no fixed order, so every edit picks its tensors by sorted key. A swap
    # is visible only between tensors of different shapes: two same-shaped weights swapped are a different
    # model that the file's checksums, recomputed by whoever edited it, cannot tell apart.
    def resize(tensors):
        key = min(k for k, t in tensors.items() if t.dim() == 4)
        tensors[key] = torch.zeros(tuple(tensors[key].shape[:-1]) + (tensors[key].shape[-1] + 1,))

    def swap(tensors):
        convs = sorted(k for k, t in tensors.items() if t.dim() == 4)
        a = convs[0]
        b = next(k for k in convs if tensors[k].shape != tensors[a].shape)
        tensors[a], tensors[b] = tensors[b], tensors[a]

    def drop(tensors):
        tensors.pop(min(tensors))

    def add(tensors):
        tensors["t_extra"] = torch.zeros(3)

    for change, message in ((resize, "in the file, but the explainer's description says"), (swap, "description says"),
                            (drop, "does not hold"), (add, "its description does not name: t_extra")):
        edited = tmp_path / "edited.gsx"
        forge(good_file, edited, replace=_with_tensors(good_file, change))
        with pytest.raises(gs.LoadError, match=message):
            gs.load(str(edited))


def _explain_nodes(d):
    return d["capture"]["explain"]["data"]["nodes"]


def _integer_tensor_needs_gradient(d):
    key = next(k for k, info in d["tensors"].items() if info["dtype"] == "torch.int64")
    d["tensors"][key]["requires_grad"] = True


def _placeholder_twice(d):
    _explain_nodes(d).insert(1, {"name": "y", "op": "placeholder", "target": "x", "args": {"tuple": []},
                                 "kwargs": {"dict": []}})


def _placeholder_self(d):
    _explain_nodes(d)[0]["target"] = "self"


@pytest.mark.parametrize("edit", [_integer_tensor_needs_gradient, _placeholder_twice, _placeholder_self],
                         ids=["an integer tensor that needs a gradient", "two inputs of one name", "an input named self"])
def test_an_edit_torch_refuses_is_a_load_error(good_file, tmp_path, edit):
    edited = tmp_path / "edited.gsx"
    forge(good_file, edited, description=edit)
    with pytest.raises(gs.LoadError, match="damaged or edited"):
        gs.load(str(edited))


def _rewritten(source, target, declared=None, compressed=(), header=None):
    """``source`` written again: its header replaced by ``header`` (a dict), the parts named in ``compressed``
    deflated, and the tensors part declared ``declared`` bytes long in the zip's directory."""
    import json
    import zlib

    contents = parts(source)
    head = header if header is not None else json.loads(contents.pop(saved.HEADER))
    contents.pop(saved.HEADER, None)
    head["parts"] = {name: zlib.crc32(data) for name, data in contents.items()}
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(saved.HEADER, json.dumps(head), compress_type=zipfile.ZIP_DEFLATED if saved.HEADER in compressed
                         else zipfile.ZIP_STORED)
        for name, data in contents.items():
            archive.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name in compressed else zipfile.ZIP_STORED)
        if declared is not None:  # the directory, written at close, says so: a memory bomb if believed
            info = archive.getinfo(saved.TENSORS)
            info.file_size = info.compress_size = declared


def test_a_tensors_part_declared_larger_than_the_file_is_refused_before_allocating(good_file, tmp_path):
    import json
    import struct

    size = 1 << 40  # a terabyte: allocating it first fails with RuntimeError, or swaps the machine to death
    table = json.dumps({"t0": {"dtype": "U8", "shape": [size - 8 - 128], "data_offsets": [0, size - 8 - 128]}})
    data = struct.pack("<Q", 128) + table.encode().ljust(128) + bytes(64)
    source = tmp_path / "source.gsx"
    forge(good_file, source, replace={saved.TENSORS: data})
    bomb = tmp_path / "bomb.gsx"
    _rewritten(source, bomb, declared=size)
    with pytest.raises(gs.LoadError, match="tensors part .* past the end of the file"):
        gs.load(str(bomb))


def test_compressed_parts_and_a_huge_header_are_refused(good_file, tmp_path):
    import json

    deflated = tmp_path / "deflated.gsx"
    _rewritten(good_file, deflated, compressed=(saved.DESCRIPTION,))  # a zip bomb's way in: never written so
    with pytest.raises(gs.LoadError, match="explainer.json is compressed"):
        gs.load(str(deflated))
    header = json.loads(parts(good_file)[saved.HEADER])
    header["padding"] = " " * (20 << 20)
    padded = tmp_path / "padded.gsx"
    _rewritten(good_file, padded, compressed=(saved.HEADER,), header=header)
    with zipfile.ZipFile(padded) as archive:
        assert archive.getinfo(saved.HEADER).compress_size < 1 << 20  # small in the file, 20 MB once inflated
    with pytest.raises(gs.LoadError, match="header is 20.* MB"):
        saved.read_header(str(padded))


def _raw_header(source, target, edit):
    """``source`` with its header's bytes edited by ``edit`` (no JSON writer involved: it would refuse a number
    longer than Python converts), the other parts as they are."""
    contents = parts(source)
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(saved.HEADER, edit(contents.pop(saved.HEADER)))
        for name, data in contents.items():
            archive.writestr(name, data)


def test_a_number_longer_than_python_converts_is_a_load_error(good_file, tmp_path):
    # json.loads refuses an integer of more than 4300 digits with a plain ValueError, not a JSONDecodeError
    big = b"1" * 5000
    header = tmp_path / "header.gsx"
    _raw_header(good_file, header, lambda data: data.replace(b'"swapped":', b'"padding": ' + big + b', "swapped":', 1))
    with pytest.raises(gs.LoadError, match="damaged header"):
        saved.read_header(str(header))
    with pytest.raises(gs.LoadError, match="damaged header"):
        gs.load(str(header))
    description = tmp_path / "description.gsx"
    text = parts(good_file)[saved.DESCRIPTION]
    forge(good_file, description, replace={saved.DESCRIPTION: text.replace(b'"tensors":{', b'"tensors":{"n":' + big + b",", 1)})
    with pytest.raises(gs.LoadError, match="damaged description"):
        gs.load(str(description))
    import json
    import struct

    data = parts(good_file)[saved.TENSORS]
    length = struct.unpack("<Q", data[:8])[0]
    table = data[8:8 + length].replace(b"{", b'{"__metadata__":{"n":' + big + b"},", 1)
    tensors = tmp_path / "tensors.gsx"
    forge(good_file, tensors, replace={saved.TENSORS: struct.pack("<Q", len(table)) + table + data[8 + length:]})
    with pytest.raises(gs.LoadError, match="tensors part has a damaged table"):
        gs.load(str(tensors))
    assert json.loads(data[8:8 + length])  # the genuine table parses


@pytest.mark.parametrize("shape", [[0, 2 ** 70], [0, 2 ** 62, 2 ** 62]], ids=["a size past int64", "strides past int64"])
def test_an_empty_tensor_with_sizes_torch_cannot_index_is_a_load_error(good_file, tmp_path, shape):
    # an empty tensor holds no bytes, so its sizes are checked against nothing in the file: torch itself refuses
    import json
    import struct

    data = parts(good_file)[saved.TENSORS]
    length = struct.unpack("<Q", data[:8])[0]
    table = json.loads(data[8:8 + length])
    table["t_empty"] = {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
    encoded = json.dumps(table).encode()
    edited = tmp_path / "edited.gsx"
    forge(good_file, edited, replace={saved.TENSORS: struct.pack("<Q", len(encoded)) + encoded + data[8 + length:]})
    with pytest.raises(gs.LoadError, match="t_empty.*which torch cannot make"):
        gs.load(str(edited))


def test_a_truncated_file_at_any_length_is_a_load_error(good_file, tmp_path):
    data = good_file.read_bytes()
    for fraction in (0.05, 0.5, 0.95, 0.999):
        cut = tmp_path / "cut.gsx"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(gs.LoadError):
            gs.load(str(cut))


# --- Saving a run-time explainer: it holds its copy of the model, so it saves and loads where the model's classes

def test_a_runtime_explainer_loads_only_with_trust(tmp_path):
    torch.manual_seed(0)
    ex = convert_runtime(EverySpelling().eval(), layer="conv2")
    x = torch.randn(2, 3, 16, 16)
    path = str(tmp_path / "r.gsx")
    ex.save(path)
    assert "run-time capture" in saved.read_header(path)["needs_trust"][0]
    with pytest.raises(gs.LoadError, match=r"run-time capture .*gs.load\(path, trust=True\)"):
        gs.load(path)
    loaded = gs.load(path, trust=True)
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
        gs.load(path, trust=True)


class ScaledGuided(gs.Rule):
    name = "scaled-guided-saved"

    def __init__(self, scale=0.5):
        self.scale = scale

    def backward(self, grad_output, output):
        return self.scale * grad_output.clamp(min=0) * (output > 0)


def test_a_rule_registered_with_other_attributes_is_not_taken_and_the_error_says_so(tmp_path):
    ex = gs.convert(make_model("resnet18"), layer="layer4", rule=ScaledGuided(0.5))
    path = str(tmp_path / "scaled.gsx")
    ex.save(path)
    gs.register_rule(ScaledGuided(0.25))
    try:
        with pytest.raises(gs.LoadError, match=r"registered here .*other attributes.*scale.*0.5"):
            gs.load(path)
        gs.register_rule(ScaledGuided(0.5), replace=True)
        x = image_batch(32)
        assert torch.equal(gs.load(path).explain(x, [1, 2]).gradient, ex.explain(x, [1, 2]).gradient)
    finally:
        gs.unregister_rule(ScaledGuided.name)


# --- The old pickled format (3) -----------------------------------------------------------------------------

def _format_3(ex, path):
    """A file as guided_swap wrote it before the safe format: the pickled explainer and a header."""
    import io
    import json

    buffer = io.BytesIO()
    torch.save(ex, buffer)
    header = {"format": saved.FORMAT, "format_version": 3, "guided_swap_version": "0.2.0",
              "torch_version": torch.__version__, "rule": "guided", "layers": list(ex.layers)}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(saved.HEADER, json.dumps(header))
        archive.writestr(saved.LEGACY_PAYLOAD, buffer.getvalue())


def test_an_old_format_file_loads_with_trust_and_saves_again_in_the_safe_format(tmp_path):
    ex = gs.convert(make_model("resnet18"), layer="layer4")
    old, new = str(tmp_path / "old.gsx"), str(tmp_path / "new.gsx")
    _format_3(ex, old)
    with pytest.raises(gs.LoadError, match=r"format 3, which is a pickle.*trust=True\) and save it again"):
        gs.load(old)
    gs.load(old, trust=True).save(new)
    assert saved.read_header(new)["format_version"] == saved.FORMAT_VERSION
    x = image_batch(32)
    assert torch.equal(gs.load(new).explain(x, [1, 2]).gradient, ex.explain(x, [1, 2]).gradient)
