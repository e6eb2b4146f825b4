"""What a conversion did, in words: every swapped rectifier call site, what was left alone, what each layer captures.

Every capture path fills one :class:`ConversionReport` (the run-time path a :class:`RuntimeReport`, whose call
sites are those seen while the model ran); ``explainer.report`` is it, ``print(explainer.report)`` its long form.

>>> report = ConversionReport("guided", (Swap("layer1.0.relu", "nn.ReLU", True),), (("act", "nn.GELU"),), (),
...                           layers={"layer4": "layer4.1.relu_1"})
>>> print(report.summary())
fx capture; rule guided: 1 rectifier call site(s) swapped; layer 'layer4' captures node 'layer4.1.relu_1'; 1 other activation(s) left alone (nn.GELU)
"""
from dataclasses import dataclass, field
from typing import Dict, Tuple

from .layout import Layout
from .targets import OutputKey


@dataclass(frozen=True)
class Swap:
    """One rectifier call site that carries the rule: its node name, how it was spelled, whether in place."""

    name: str
    spelling: str
    inplace: bool


@dataclass(frozen=True)
class ConversionReport:
    """What the conversion did: the swapped rectifier call sites, what was left alone and why."""

    rule: str
    swapped: Tuple[Swap, ...]
    left_alone: Tuple[Tuple[str, str], ...]
    hidden_in_leaves: Tuple[str, ...]
    layers: Dict[str, str] = field(default_factory=dict)
    layer_reasons: Dict[str, str] = field(default_factory=dict)
    made_out_of_place: Tuple[str, ...] = ()
    forked: bool = False
    capture: str = "fx"
    ordinary_rule: bool = False
    layouts: Dict[str, Layout] = field(default_factory=dict)  # how each capture becomes (B, C, *spatial)
    fixed_arguments: Tuple[str, ...] = ()  # forward's arguments traced as values ("mask=None", "scale=0.5")
    output: OutputKey = None            # the entry of a structured output that is explained (None: the output)
    output_by_default: bool = False     # True: ``output`` was read without output= (``logits``, or the only entry)

    def _layer_names(self):
        return list(dict.fromkeys(list(self.layers) + list(self.layer_reasons)))

    def _layer_line(self, name: str, reason_format: str) -> str:
        node = self.layers.get(name)
        line = f"layer {name!r} captures node {node!r}" if node else f"layer {name!r}"
        layout = getattr(self, "layouts", {}).get(name)  # reports saved before layouts had none
        if layout is not None and layout.kind != "nchw":
            line += f" [{layout.describe()}]"
        reason = self.layer_reasons.get(name)
        return line + (" " + reason_format.format(reason) if reason else "")

    def output_line(self, long: bool = False) -> str:
        """Which entry of the model's output is explained ('' when the output is one tensor)."""
        key = getattr(self, "output", None)  # reports saved before outputs were recorded have none
        if key is None:
            return ""
        if not getattr(self, "output_by_default", False):
            return f"explains output {key!r}"
        return f"explains output {key!r} (" + ("read by default: the model's output names a 'logits' entry, or only "
                                               "this one; convert with output=KEY to explain another" if long else "by default") + ")"

    def summary(self) -> str:
        """One line: the capture path, how many rectifiers carry the rule, the output explained, the layers,
        what was left alone."""
        if self.ordinary_rule:
            parts = [f"{self.capture} capture; rule {self.rule}: ordinary gradients, nothing swapped"]
        elif "pending" in self.capture:
            parts = [f"{self.capture}; rule {self.rule}"]
        else:
            parts = [f"{self.capture} capture; rule {self.rule}: {len(self.swapped)} rectifier call site(s) swapped"]
        parts += [self.output_line()] if self.output_line() else []
        parts += [self._layer_line(name, "({})") for name in self._layer_names()]
        if self.left_alone:
            kinds = sorted({kind for _, kind in self.left_alone})
            parts.append(f"{len(self.left_alone)} other activation(s) left alone ({', '.join(kinds)})")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"capture: {self.capture}", f"rule: {self.rule}"] + ([self.output_line(long=True)] if self.output_line() else [])
        if self.ordinary_rule:
            lines.append("the rule's gradient is the ordinary one: no rectifier needs swapping")
        else:
            lines.append(f"swapped {len(self.swapped)} rectifier call site(s):")
            lines += [f"  {s.name}  ({s.spelling}{', in place' if s.inplace else ''})" for s in self.swapped]
        if self.left_alone:
            lines.append(f"left alone, ordinary gradient ({len(self.left_alone)}): only rectifiers carry a rule")
            lines += [f"  {name}  ({kind})" for name, kind in self.left_alone]
        if self.hidden_in_leaves:
            lines.append("NOT swapped, ReLUs hidden inside leaf modules: " + ", ".join(self.hidden_in_leaves))
        lines += [self._layer_line(name, " [{}]") for name in self._layer_names()]
        if self.made_out_of_place:
            lines.append("made out of place to keep captures intact: " + ", ".join(self.made_out_of_place))
        if self.forked:
            lines.append("rectifiers follow a captured layer: Grad-CAM takes its gradient from a plain copy of that tail")
        if self.fixed_arguments:
            lines.append("traced with forward's arguments fixed at: " + ", ".join(self.fixed_arguments)
                         + " (explain a tuple of inputs, or pass forward_args=, to give them: that call is traced "
                         "again once)")
        return "\n".join(lines)


@dataclass(frozen=True)
class RuntimeReport(ConversionReport):
    """The conversion report of a run-time explainer: call sites are those seen while the model ran."""

    runs: int = 0                 # forward passes the call sites were gathered from
    tail_backward: bool = False   # Grad-CAM's gradient came from a second backward through the captured tail

    def summary(self) -> str:
        if not self.runs:
            return super().summary() + "; call sites are listed once the model has run (or convert with example_input=)"
        return super().summary() + f" (seen in {self.runs} forward pass(es))"

    def __str__(self) -> str:
        lines = [super().__str__(),
                 f"call sites as seen while the model ran ({self.runs} forward pass(es)); a branch that has not run "
                 "is not listed, and every rectifier call that runs carries the rule"]
        if self.tail_backward:
            lines.append("rectifiers follow a captured layer: Grad-CAM's ordinary gradient comes from a second "
                         "backward through that tail with ordinary rectifier gradients (one forward)")
        return "\n".join(lines)
