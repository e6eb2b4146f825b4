"""An explainer's capture as the description a saved file holds, and the capture rebuilt from it.

A graph capture (fx or export; also one chosen on the first input, a deferred capture) is written as data: its
rule (:mod:`guided_swap.run.report_file`), layers, output entry, input spec, report, and its two graphs
(:mod:`guided_swap.run.graph_file`), whose modules and tensors are shared through one table. A graph that
cannot be written as data, and a run-time capture (it holds a copy of the model, whose classes are the user's),
are pickled; the description lists each pickled object with the reason, and those load only with
``trust=True``.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> description, packer = describe(ex.capture)
>>> description["capture"]["kind"], description["capture"]["layers"], packer.needs
('graph', ['layer4'], {})
"""
from typing import Any, Dict, Optional, Tuple

from torch import fx

from ..capture.base import Capture
from ..capture.choose import DeferredCapture
from ..capture.graph.graph_capture import GraphCapture
from ..core.errors import LoadError
from ..core.inputs import TENSOR, Signature
from .file_values import NotData, Packer, Unpacker, pack, unpack
from .graph_file import pack_graph, unpack_graph
from .module_file import ModuleReader
from .report_file import report_data, report_from, rule_data, rule_from


def describe(capture: Capture) -> Tuple[Dict[str, Any], Packer]:
    """The description of ``capture`` and the packer holding its tensors and pickled objects."""
    packer = Packer(capture.rule)
    description = {"rule": rule_data(capture.rule, packer), "capture": _capture_data(capture, packer)}
    description.update(modules=packer.modules, tensors=packer.tensor_info, pickled=packer.needs)
    return description, packer


def _capture_data(capture: Capture, packer: Packer) -> Dict[str, Any]:
    if isinstance(capture, DeferredCapture):
        return {"kind": "deferred", "chosen": _capture_data(capture.chosen, packer)}
    if isinstance(capture, GraphCapture):
        return {"kind": "graph", "layers": list(capture.layers), "output": capture.output,
                "input_spec": None if capture.input_spec is None else list(capture.input_spec),
                "forked": capture.forked, "report": report_data(capture.report, packer),
                "signature": _signature_data(capture.signature, packer),
                "forward": _graph(capture.forward_module, packer), "explain": _graph(capture.explain_module, packer)}
    why = (f"a run-time capture ({capture.report.capture}), which holds a copy of the model "
           f"({type(getattr(capture, 'model', capture)).__qualname__}) and its classes")
    return {"kind": "pickled", "object": packer.pickle(capture, why)}


def _signature_data(signature: Signature, packer: Packer) -> Dict[str, Any]:
    try:
        return {"data": pack(tuple(signature), packer)}
    except NotData as why:
        return {"pickled": packer.pickle(tuple(signature), f"a forward argument traced as a value that is not data: {why}")}


def _signature_from(data: Any, unpacker: Unpacker) -> Signature:
    if data is None:  # written before several inputs were: one input
        return Signature()
    if isinstance(data, dict) and set(data) == {"pickled"}:
        value = unpacker.pickled(data["pickled"])
    elif isinstance(data, dict) and set(data) == {"data"}:
        value = unpack(data["data"], unpacker)
    else:
        raise LoadError("the file's call signature is neither data nor pickled: it is damaged or edited")
    if not (isinstance(value, tuple) and len(value) == 2 and type(value[0]) is int and value[0] >= 1
            and isinstance(value[1], tuple)
            and all(e == TENSOR or (isinstance(e, tuple) and len(e) == 2 and e[0] == "value") for e in value[1])):
        raise LoadError("the file's call signature is not (inputs, forward arguments): it is damaged or edited")
    return Signature(*value)


def _graph(gm: fx.GraphModule, packer: Packer) -> Dict[str, Any]:
    try:
        return {"data": pack_graph(gm, packer)}
    except NotData as why:
        return {"pickled": packer.pickle(gm, f"a graph that is not data: {why}")}


def rebuild(description: Any, raw: Dict[str, Any], pickled: Optional[Dict[str, Any]],
            map_location: Any = None) -> Capture:
    """The capture ``description`` describes, from the file's tensors ``raw`` and (trusted files only) its
    pickled objects; :class:`LoadError` for anything that is not a description guided_swap writes."""
    if not isinstance(description, dict) or not {"rule", "capture", "modules", "tensors", "pickled"} <= set(description):
        raise LoadError("the file's description lacks its rule, capture, modules, tensors or pickled table: it is "
                        "damaged or edited")
    needs = description["pickled"]
    if not isinstance(needs, dict) or not isinstance(description["tensors"], dict):
        raise LoadError("the file's tensor or pickled table is not a table: it is damaged or edited")
    extra = sorted(set(raw) - set(description["tensors"]))
    if extra:
        raise LoadError(f"the file holds tensors its description does not name: {', '.join(extra[:3])}: it is "
                        "damaged or edited")
    unpacker = Unpacker(description["tensors"], raw, pickled, None, map_location, needs)
    ModuleReader(description["modules"], unpacker)
    unpacker.rule = rule_from(description["rule"], unpacker)
    return _capture_from(description["capture"], unpacker)


def _capture_from(data: Any, unpacker: Unpacker) -> Capture:
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "pickled":
        capture = unpacker.pickled(data.get("object"))
        if not isinstance(capture, Capture):
            raise LoadError(f"the file's capture is a {type(capture).__name__}, not a guided_swap capture")
        return capture
    if kind == "deferred":
        chosen = _capture_from(data.get("chosen"), unpacker)
        deferred = DeferredCapture(None, chosen.rule, chosen.layers, chosen.output, "export")
        deferred.chosen = chosen
        return deferred
    if kind == "graph":
        return _graph_capture(data, unpacker)
    raise LoadError(f"the file's capture is of kind {str(kind)[:40]!r}, which guided_swap does not write")


def _graph_capture(data: Dict[str, Any], unpacker: Unpacker) -> GraphCapture:
    spec = data.get("input_spec")
    if not (spec is None or (type(spec) is list and len(spec) == 2 and all(type(v) is int for v in spec))):
        raise LoadError("the file's input spec is not (rank, channels): it is damaged or edited")
    output = unpack(data.get("output"), unpacker)
    if output is not None and type(output) not in (str, int) or type(data.get("forked")) is not bool:
        raise LoadError("the file's output entry or fork flag is not one guided_swap writes: it is edited")
    return GraphCapture.restored(unpacker.rule, plain_layers(data.get("layers")), output,
                                 None if spec is None else tuple(spec), _graph_from(data.get("forward"), unpacker),
                                 _graph_from(data.get("explain"), unpacker), data["forked"],
                                 report_from(data.get("report"), unpacker), _signature_from(data.get("signature"), unpacker))


def plain_layers(layers: Any) -> Tuple[str, ...]:
    if type(layers) is not list or not all(isinstance(name, str) for name in layers):
        raise LoadError("the file's layers are not a list of names: it is damaged or edited")
    return tuple(layers)


def _graph_from(data: Any, unpacker: Unpacker) -> fx.GraphModule:
    if isinstance(data, dict) and set(data) == {"pickled"}:
        gm = unpacker.pickled(data["pickled"])
    elif isinstance(data, dict) and set(data) == {"data"} and isinstance(data["data"], dict):
        gm = unpack_graph(data["data"], unpacker)
    else:
        raise LoadError("the file's graph is neither data nor a pickled graph: it is damaged or edited")
    if not isinstance(gm, fx.GraphModule):
        raise LoadError(f"the file's graph is a {type(gm).__name__}, not a torch.fx GraphModule")
    return gm
