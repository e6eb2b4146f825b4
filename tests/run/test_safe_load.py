"""Opening a saved explainer runs no code from the file unless the caller says trust=True.

Every hostile file here would write a marker file if loading ran its code: a pickle whose unpickling opens the
marker for writing, or an edited description whose names, targets, attributes or shape conditions would make the
generated forward (or an import) do it. Without trust each raises LoadError and the marker is never written; the
pickle one writes it with trust=True, which shows the payload is live.
"""
import io
import json
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_swap as gs
from guided_swap.run import saved

from conftest import randomise_batchnorm
from hostile import WritesMarker, forge, marker_written
from untraceable_models import ShapeAssertNet


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


class OwnLeaf(nn.Module):
    """A user's leaf module: its class is not on the allow-list, so it is pickled."""

    def forward(self, x):
        return x * 2


class WithOwnLeaf(TinyNet):
    def __init__(self):
        super().__init__()
        self.leaf = OwnLeaf()

    def forward(self, x):
        return super().forward(self.leaf(x))


@pytest.fixture
def marker(tmp_path):
    return str(tmp_path / "marker")


@pytest.fixture(scope="module")
def fx_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fx") / "tiny.gsx"
    gs.convert(randomise_batchnorm(TinyNet()).eval(), layer="conv").save(str(path))
    return path


@pytest.fixture(scope="module")
def export_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "assert.gsx"
    gs.convert(ShapeAssertNet().eval(), layer="stem", capture="export", example_input=torch.randn(1, 3, 32, 32)
               ).save(str(path))
    return path


def _pickle(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _nodes(description, graph="explain"):
    return description["capture"][graph]["data"]["nodes"]


def _first(description, op, graph="explain"):
    return next(n for n in _nodes(description, graph) if n["op"] == op)


# --- a hostile pickle inside a .gsx ---------------------------------------------------------------------

def _rule_from_pickle(d):
    d["rule"] = {"name": "evil", "class": "evil.Evil", "pickled": "p0"}
    d["pickled"] = {"p0": "nothing to worry about"}


def _graph_from_pickle(d):
    d["capture"]["explain"] = {"pickled": "p0"}
    d["pickled"] = {"p0": "a graph"}


def _module_from_pickle(d):
    d["modules"][next(iter(d["modules"]))] = {"pickled": "p0"}
    d["pickled"] = {"p0": "a module"}


def _capture_from_pickle(d):
    d["capture"] = {"kind": "pickled", "object": "p0"}
    d["pickled"] = {"p0": "a capture"}


@pytest.mark.parametrize("refer", [_rule_from_pickle, _graph_from_pickle, _module_from_pickle, _capture_from_pickle],
                         ids=["rule", "graph", "module", "capture"])
def test_a_hostile_pickle_is_never_unpickled_without_trust(fx_file, tmp_path, marker, refer):
    hostile = tmp_path / "hostile.gsx"
    forge(fx_file, hostile, description=refer, replace={saved.PICKLED: _pickle({"p0": WritesMarker(marker)})},
          header=lambda h: h.update(needs_trust=[]))  # the header lies: nothing needs trust
    with pytest.raises(gs.LoadError, match=r"trust=True"):
        gs.load(str(hostile))
    assert not marker_written(marker)
    with pytest.raises(gs.LoadError):  # trusted: unpickled (the payload runs), then refused as no explainer part
        gs.load(str(hostile), trust=True)
    assert marker_written(marker)


def test_a_pickled_part_nothing_refers_to_is_not_even_read(fx_file, tmp_path, marker):
    hostile = tmp_path / "hostile.gsx"
    forge(fx_file, hostile, replace={saved.PICKLED: _pickle({"p0": WritesMarker(marker)})})
    assert gs.load(str(hostile)).layers == ("conv",)
    assert not marker_written(marker)


def test_an_old_format_pickle_is_refused_without_trust(tmp_path, marker):
    hostile = tmp_path / "old.gsx"
    header = {"format": saved.FORMAT, "format_version": 3, "guided_swap_version": "0.2.0",
              "torch_version": torch.__version__, "rule": "guided", "layers": ["conv"]}
    with zipfile.ZipFile(hostile, "w") as archive:
        archive.writestr(saved.HEADER, json.dumps(header))
        archive.writestr(saved.LEGACY_PAYLOAD, _pickle(WritesMarker(marker)))
    with pytest.raises(gs.LoadError, match="format 3, which is a pickle"):
        gs.load(str(hostile))
    assert not marker_written(marker)


# --- an edited description: code through names, targets, attributes -------------------------------------

def _code(marker):
    return f"__import__('builtins').open({marker!r}, 'w')"


def _call(target, args):
    def edit(d):
        node = _first(d, "call_function")
        node["target"], node["args"] = target, args
    return edit


def _method(name, args):
    def edit(d):
        node = next(n for n in _nodes(d) if n["op"] == "call_function" and n["target"] == {"function": "guided_swap.rectify"})
        node["op"], node["target"] = "call_method", name
        node["args"] = {"tuple": [node["args"]["tuple"][0]] + args}
    return edit


def _edit(path, value):
    def edit(d):
        *keys, last = path(d)
        target = d
        for key in keys:
            target = target[key]
        target[last] = value(target[last]) if callable(value) else value
    return edit


def _module_key(d, cls):
    return next(k for k, m in d["modules"].items() if m.get("class", "").endswith(cls))


def _module_method_through_a_field(d):
    nodes = _nodes(d)
    nodes.insert(1, {"name": "built", "op": "call_function", "target": {"namedtuple": ["Fake", ["register_forward_hook"]]},
                     "args": {"tuple": [1]}, "kwargs": {"dict": []}})
    nodes.insert(2, {"name": "conv_module", "op": "get_attr", "target": "conv", "args": {"tuple": []},
                     "kwargs": {"dict": []}})
    nodes.insert(3, {"name": "hook", "op": "call_function", "target": {"function": "builtins.getattr"},
                     "args": {"tuple": [{"node": "conv_module"}, "register_forward_hook"]}, "kwargs": {"dict": []}})


def _cases(marker):
    code = _code(marker)
    functions = ["builtins.exec", "builtins.eval", "builtins.__import__", "os.system", "subprocess.run", "torch.load",
                 "torch.from_file", "aten.from_file", "torch.hub.load", "importlib.import_module", "torch.ops.load_library",
                 "aten.__class__", "operator.call", "operator.methodcaller",
                 # attributes of the aten namespace and its ops that are no op, and the op that prints
                 "aten.add.overloads", "aten.add._op", "aten.name.upper", "aten._dir.clear", "aten._print.default"]
    cases = {f"call {name}": _call({"function": name}, {"tuple": [code]}) for name in functions}
    cases.update({
        "method __reduce_ex__": _method("__reduce_ex__", [2]),
        "method register_hook": _method("register_hook", []),
        "method apply_": _method("apply_", []),
        "method type by name": _method("type", ["builtins.open"]),
        "method untyped_storage": _method("untyped_storage", []),
        "getattr __class__": _call({"function": "builtins.getattr"}, {"tuple": [{"node": "x"}, "__class__"]}),
        "getattr grad_fn": _call({"function": "builtins.getattr"}, {"tuple": [{"node": "x"}, "grad_fn"]}),
        # a field of a named tuple built elsewhere in the graph, read from a module: its bound method
        "getattr a module's method through a forged field": _module_method_through_a_field,
        "a function as an argument": _call({"function": "torch.relu"}, {"tuple": [{"function": "builtins.exec"}]}),
        "a constant that is no dtype": _call({"function": "torch.relu"}, {"tuple": [{"constant": "builtins.open"}]}),
        "node name": lambda d: _first(d, "call_module").update(name=f"x = {code}; y"),
        "placeholder target": lambda d: _first(d, "placeholder").update(target=f"x={code}"),
        "get_attr target": lambda d: _first(d, "get_attr").update(target=f'gs_rule"); {code}; ("'),
        "keyword name": lambda d: next(n for n in _nodes(d) if n["kwargs"].get("dict")).update(
            kwargs={"dict": [[f"upper={code}#", None]]}),
        "named tuple field": lambda d: _nodes(d)[-1].update(
            args={"tuple": [{"namedtuple": ["Out", [f"a=1,{code}"]], "items": [1]}]}),
        "module class Popen": lambda d: d["modules"][_module_key(d, "Conv2d")].update(**{"class": "subprocess.Popen"}),
        "module class GraphModule": lambda d: d["modules"][_module_key(d, "Conv2d")].update(
            **{"class": "torch.fx.graph_module.GraphModule"}),
        "module attribute replaces forward": lambda d: d["modules"][_module_key(d, "Conv2d")]["state"].update(
            forward={"function": "torch.nn.functional.relu"}),
        "module attribute is a hook table": lambda d: d["modules"][_module_key(d, "Conv2d")]["state"].update(
            _forward_hooks={"dict": []}),
        "module attribute holds exec": lambda d: d["modules"][_module_key(d, "Conv2d")]["state"].update(
            padding_mode={"function": "builtins.exec"}),
        "module called through _compiled_call_impl": lambda d: d["modules"][_module_key(d, "Conv2d")]["state"].update(
            _compiled_call_impl={"function": "torch.nn.functional.relu"}),
    })
    return cases


CASE_NAMES = list(_cases("m"))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_an_edited_description_cannot_run_code(fx_file, tmp_path, marker, case):
    hostile = tmp_path / "hostile.gsx"
    forge(fx_file, hostile, description=_cases(marker)[case])
    with pytest.raises(gs.LoadError):
        gs.load(str(hostile))
    assert not marker_written(marker)


def _twin_module(d):
    """The graph calls a second module named "\uff43onv" (a fullwidth c), which Python's parser reads as "conv"."""
    graph, key = d["capture"]["explain"]["data"], "m_twin"
    d["modules"][key] = dict(d["modules"][graph["attributes"]["conv"]["module"]])
    graph["attributes"]["\uff43onv"] = {"module": key}
    next(n for n in graph["nodes"] if n["op"] == "call_module" and n["target"] == "conv")["target"] = "\uff43onv"


def _twin_placeholder(d):
    _first(d, "placeholder").update(target="\uff58")  # read as "x"


@pytest.mark.parametrize("edit", [_twin_module, _twin_placeholder], ids=["module path", "input name"])
def test_a_name_python_reads_as_another_is_refused(fx_file, tmp_path, edit):
    # Python NFKC-normalises the names in code: the forward generated from the graph would use another attribute
    # than the graph names, so the checked graph would not be the code that runs
    hostile = tmp_path / "hostile.gsx"
    forge(fx_file, hostile, description=edit)
    with pytest.raises(gs.LoadError, match="not a plain|damaged or edited"):
        gs.load(str(hostile))


# torch.fx writes an argument into the forward's code with repr() inside a dict, a set or a named tuple's items,
# and a named tuple's repr is a call of its name: one called "open" there is open(file=..., mode="w"). In a
# placeholder's default value that code runs as the forward is defined, i.e. while the file loads.

def _opener(marker):
    return {"namedtuple": ["open", ["file", "mode"]], "items": [marker, "w"]}


def _opener_cases(marker):
    opener = _opener(marker)
    containers = {"a set": {"set": [opener]}, "a dict": {"dict": [["k", opener]]},
                  "a dict key": {"dict": [[opener, 1]]},
                  "a named tuple's items": {"namedtuple": ["Outer", ["a"]], "items": [opener]},
                  "a list in a dict": {"dict": [["k", {"list": [opener]}]]},
                  "a tuple in a set": {"set": [{"tuple": [1, opener]}]}}

    def default(value):
        return lambda d: _first(d, "placeholder").update(args={"tuple": [value]})

    def keyword(value):
        return lambda d: _first(d, "call_method").update(kwargs={"dict": [["dim", value]]})

    cases = {f"placeholder default: {where}": default(value) for where, value in containers.items()}
    cases.update({f"keyword argument: {where}": keyword(value) for where, value in containers.items()})
    return cases


@pytest.mark.parametrize("case", list(_opener_cases("m")))
def test_a_named_tuple_written_by_repr_cannot_call_a_builtin(fx_file, tmp_path, marker, case):
    hostile = tmp_path / "hostile.gsx"
    forge(fx_file, hostile, description=_opener_cases(marker)[case])
    try:
        with pytest.raises(gs.LoadError, match="named tuple"):
            gs.load(str(hostile)).explain(torch.randn(1, 3, 8, 8))
    finally:
        assert not marker_written(marker)


@pytest.mark.parametrize("where", ["keyword", "positional"])
def test_a_shape_condition_that_is_code_is_refused(export_file, tmp_path, marker, where):
    def edit(d):
        node = next(n for n in _nodes(d) if n["target"] == {"function": "guided_swap.check_input_shape"})
        condition = {"tuple": [_code(marker)]}
        if where == "keyword":
            node["kwargs"] = {"dict": [["guards", condition]]}
        else:
            node["args"] = {"tuple": node["args"]["tuple"] + [condition]}
            node["kwargs"] = {"dict": []}

    hostile = tmp_path / "hostile.gsx"
    forge(export_file, hostile, description=edit)
    with pytest.raises(gs.LoadError, match="conditions that are not arithmetic"):
        gs.load(str(hostile))
    assert not marker_written(marker)
    loaded = gs.load(str(export_file))  # the genuine file keeps its conditions
    with pytest.raises(gs.InputError, match="does not fit"):
        loaded.explain(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize("condition", ["((((x.size()[2] ** 64) ** 64) ** 64) ** 64) ** 64 > 0",
                                       "max(x.size()[2] ** 64, 1) ** 64 > 0", "int(x.size()[3] ** 9) ** 9 > 0"])
def test_a_shape_condition_that_would_exhaust_memory_is_refused(export_file, tmp_path, condition):
    # powers of powers: 48 ** (64 ** 5) is a number of a billion digits, computed on the first explain
    def edit(d):
        node = next(n for n in _nodes(d) if n["target"] == {"function": "guided_swap.check_input_shape"})
        node["kwargs"] = {"dict": [["guards", {"tuple": [condition]}]]}

    hostile = tmp_path / "hostile.gsx"
    forge(export_file, hostile, description=edit)
    with pytest.raises(gs.LoadError, match="conditions that are not arithmetic"):
        gs.load(str(hostile))


# --- what needs trust, said plainly ------------------------------------------------------------------------

class TopValues(TinyNet):
    """Reads the fields of torch's named results (``max(...).values``, ``topk(...).indices``)."""

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).flatten(2)
        pooled = x.max(dim=2).values + torch.max(x, 2).values + x.topk(2, dim=2).values.mean(2)
        return self.head(pooled) + x.sort(dim=2).indices.float().mean()


def test_the_fields_of_torch_named_results_are_data(tmp_path):
    torch.manual_seed(0)
    ex = gs.convert(randomise_batchnorm(TopValues()).eval(), layer="conv")
    path = str(tmp_path / "top.gsx")
    ex.save(path)
    assert saved.read_header(path)["needs_trust"] == []
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gs.load(path).explain(x, [0, 1]).gradient, ex.explain(x, [0, 1]).gradient)


def test_a_custom_leaf_module_needs_trust_and_is_named(tmp_path):
    torch.manual_seed(0)
    model = randomise_batchnorm(WithOwnLeaf()).eval()
    ex = gs.convert(model, layer="conv", tracer_kwargs={"leaf_modules": [OwnLeaf]})
    path = str(tmp_path / "leaf.gsx")
    ex.save(path)
    assert any("OwnLeaf" in why for why in saved.read_header(path)["needs_trust"])
    with pytest.raises(gs.LoadError, match=r"a module of class .*OwnLeaf.*gs.load\(path, trust=True\)"):
        gs.load(path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gs.load(path, trust=True).explain(x, [0, 1]).gradient, ex.explain(x, [0, 1]).gradient)


def test_a_reshape_function_needs_trust(tmp_path):
    torch.manual_seed(0)
    ex = gs.convert(randomise_batchnorm(TinyNet()).eval(), layer="conv", reshape=torch.nn.Identity())
    path = str(tmp_path / "reshape.gsx")
    ex.save(path)
    with pytest.raises(gs.LoadError, match="reshape= function"):
        gs.load(path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gs.load(path, trust=True).explain(x, [0, 1]).cam, ex.explain(x, [0, 1]).cam)
