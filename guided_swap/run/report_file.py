"""The rule, the conversion report and the layouts of a saved explainer, as data.

A rule is written by its registered name and class (and its attributes, when they are data). Loading takes the
rule registered under that name in the loading process when its class and attributes match: the built-in rules
always, a user's rule once the user has registered it (``gs.register_rule``), so no code comes from the file.
A user's rule is also pickled into the file, for ``trust=True`` where it is not registered. The report is plain
data; a layout given as a ``reshape=`` callable is pickled (``trust=True``).

>>> import guided_swap as gs
>>> from guided_swap.run.file_values import Packer, Unpacker
>>> packer = Packer(rule=None)
>>> data = rule_data(gs.get_rule("guided"), packer)
>>> data, rule_from(data, Unpacker({}, {}, None, None)) is gs.get_rule("guided")
({'name': 'guided', 'class': 'guided_swap.core.rules.Guided'}, True)
"""
from dataclasses import fields
from typing import Any, Dict

from ..core.errors import LoadError
from ..core.layout import Layout
from ..core.report import ConversionReport, Swap
from ..core.rules import BUILT_IN, Rule, get_rule, rules
from .file_values import NotData, Packer, Unpacker, pack, unpack

_LAYOUT_FIELDS = ("kind", "grid", "prefix", "suffix", "permutation", "input_size", "reason")


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# --- the rule ---------------------------------------------------------------------------------------------

def rule_data(rule: Rule, packer: Packer) -> Dict[str, Any]:
    """The rule by name and class; a user's rule also with its attributes and pickled (for ``trust=True``)."""
    data = {"name": rule.name, "class": _class_path(rule)}
    if rule.name in BUILT_IN and get_rule(rule.name) == rule:
        return data
    try:
        data["state"] = pack(vars(rule), Packer(None))
    except NotData:
        pass
    data["pickled"] = packer.pickle(rule, f"the rule {rule.name!r} ({_class_path(rule)}), not a built-in one")
    return data


def rule_from(data: Any, unpacker: Unpacker) -> Rule:
    """The registered rule the file names, when it matches; else the pickled one (``trust=True``)."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise LoadError("the file names no rule: it is damaged or edited")
    name, path = data["name"], data.get("class")
    registered = get_rule(name) if name in rules() else None
    if registered is not None and _class_path(registered) == path and (
            name in BUILT_IN or data.get("state") == _state(registered)):
        return registered
    if name in BUILT_IN or "pickled" not in data:
        raise LoadError(f"the file names the rule {name!r} of class {path!r}, which is not the rule registered here "
                        "under that name: the file is damaged or edited")
    try:
        rule = unpacker.pickled(data["pickled"])
    except LoadError as error:
        raise LoadError(f"the file's rule {name!r} ({path}) is not a built-in rule. {_how_to_register(data, registered)}"
                        f" and no code from the file runs; or: {error}") from None
    if not isinstance(rule, Rule):
        raise LoadError(f"the file's rule is a {type(rule).__name__}, not a guided_swap Rule")
    return rule


def _how_to_register(data: Dict[str, Any], registered: Any) -> str:
    """What to register for a user's rule to be taken from this process instead of the file."""
    call = f"gs.register_rule({str(data.get('class')).rsplit('.', 1)[-1]}(...)"
    if registered is None:
        return f"Register it in this process before loading ({call}))"
    if _class_path(registered) != data.get("class"):
        return (f"The rule registered here under that name is a {_class_path(registered)}: register the file's "
                f"class instead ({call}, replace=True))")
    try:
        saved = unpack(data.get("state"), Unpacker({}, {}, None, None))
    except LoadError:
        saved = str(data.get("state"))[:80]
    return (f"The rule registered here under that name has other attributes ({vars(registered)}) than the file's "
            f"({saved}): register one equal to the file's ({call}, replace=True))")


def _state(rule: Rule) -> Any:
    try:
        return pack(vars(rule), Packer(None))
    except NotData:
        return None


# --- the report and its layouts ------------------------------------------------------------------------------

def report_data(report: ConversionReport, packer: Packer) -> Dict[str, Any]:
    """The conversion report as data (a layout's ``reshape=`` callable pickled)."""
    data = {f.name: pack(getattr(report, f.name), packer) for f in fields(report) if f.name not in ("swapped", "layouts")}
    data["swapped"] = [[s.name, s.spelling, s.inplace] for s in report.swapped]
    data["layouts"] = {layer: _layout_data(layout, packer) for layer, layout in report.layouts.items()}
    return data


def _layout_data(layout: Layout, packer: Packer) -> Dict[str, Any]:
    data = {name: pack(getattr(layout, name), packer) for name in _LAYOUT_FIELDS}
    if layout.reshape is not None:
        name = getattr(layout.reshape, "__qualname__", type(layout.reshape).__qualname__)
        data["reshape"] = packer.pickle(layout.reshape, f"the reshape= function {name}")
    return data


def report_from(data: Any, unpacker: Unpacker) -> ConversionReport:
    """The report ``data`` describes; :class:`LoadError` when it is not one."""
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(ConversionReport)}:
        raise LoadError("the file's conversion report does not have the fields of one: it is damaged or edited")
    values = {name: unpack(value, unpacker) for name, value in data.items() if name not in ("swapped", "layouts")}
    swapped = tuple(Swap(*entry) for entry in _rows(data["swapped"], 3))
    layouts = {layer: _layout_from(layout, unpacker) for layer, layout in _table(data["layouts"]).items()}
    return ConversionReport(swapped=swapped, layouts=layouts, **values)


def _layout_from(data: Any, unpacker: Unpacker) -> Layout:
    if not isinstance(data, dict) or not set(_LAYOUT_FIELDS) <= set(data) <= set(_LAYOUT_FIELDS) | {"reshape"}:
        raise LoadError("a layout in the file does not have the fields of one: it is damaged or edited")
    values = {name: unpack(data[name], unpacker) for name in _LAYOUT_FIELDS}
    reshape = unpacker.pickled(data["reshape"]) if "reshape" in data else None
    return Layout(reshape=reshape, **values)


def _rows(rows: Any, width: int):
    if type(rows) is not list or not all(type(r) is list and len(r) == width for r in rows):
        raise LoadError("the file's report lists swaps that are not rows of name, spelling, in place: it is edited")
    return rows


def _table(table: Any) -> Dict[str, Any]:
    if not isinstance(table, dict):
        raise LoadError("the file's report has no layout table: it is damaged or edited")
    return table
