"""The module paths of guided_swap 0.2 (one flat package), kept for one release as deprecated aliases.

``import guided_swap.maps`` still works and warns once that it moved (to ``guided_swap.core.maps``); files that
name the old paths inside them (pickles) load the same way. The aliases go in the next release.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "errors": "core.errors", "rules": "core.rules", "cam": "core.cam", "maps": "core.maps", "targets": "core.targets",
    "layouts": "core.layout", "spellings": "capture.spellings", "ops": "capture.ops", "trace": "capture.graph.trace",
    "rewrite": "capture.graph.rewrite", "axes": "capture.graph.axes", "capture": "capture.graph.layers",
    "export_capture": "capture.graph.export_trace", "runtime_capture": "capture.runtime.live_swap",
    "runtime_explainer": "capture.runtime.runtime_capture", "explainer": "run.explainer", "build": "run.convert",
    "smoothing": "run.smoothing", "compiled": "run.compiled", "io": "run.saved", "images": "media.images",
    "labels": "media.labels", "viz": "media.viz", "reference": "checks.reference", "sanity": "checks.sanity",
    "benchmark": "checks.benchmark", "demo": "checks.demo", "cli": "app.cli", "folder": "app.folder",
    "results": "app.results", "writing": "app.writing", "decoding": "app.decoding", "distributed": "app.distributed",
    "model_spec": "app.model_spec",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``guided_swap.OLD`` and hands out the module it moved to (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        package, _, old = name.partition(".")
        if package == "guided_swap" and old in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = "guided_swap." + MOVED[spec.name.partition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; the old name is an alias for one release", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module it moved to is imported already


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
