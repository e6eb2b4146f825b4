"""The folder runner behind ``guided-swap explain``: plan, decode in DataLoader workers, explain, write.

One run:

1. rank 0 finds the inputs and checks the layout, reading only; takes OUT's lock for the run (a second run on
   OUT is refused; the ranks of this one share it); sorts the inputs into done (same settings), to do, and
   failed (an input that cannot be read, or whose result's place is taken: its index line says why)
   (:mod:`guided_swap.app.results`), before any model is built;
2. every rank builds the explainer; rank 0 makes ``OUT``, removes the temporaries a killed run left there and
   marks in the index the inputs this run makes ("not explained yet", so no line outlives the result it names);
   every rank takes its share of the inputs to do (:mod:`guided_swap.app.distributed`),
   decodes them in ``workers`` DataLoader processes and writes one ``.npz`` and/or ``.png`` per input, each
   atomically, each carrying its record;
3. with one colour scale for the run (``--scale shared``, the default), the figures wait for a drawing pass:
   rank 0 merges the records' sums into one range per kind of map, and the figures missing or on another range
   are drawn from the maps already saved, so no input is explained twice in one run (with ``--smooth N`` that
   would cost N copies again). With ``--save png,npz`` they come from the ``.npz`` files; with ``--save png``
   step 2 also wrote the arrays each figure shows (:func:`~guided_swap.app.writing.figure_names`, float32 as
   computed) to a hidden temporary ``OUT/.NAME.maps.PID-TOKEN.part``, removed once its figure is drawn or the
   run stops. Each file must carry the very record rank 0 made the range from (its fingerprint), so a file
   another process replaced meanwhile is not drawn from: that input's index line says so. Each rank draws the
   figures of the inputs it explained, from its own files, and its share of the done results to redraw. A done
   result whose figure is on an old range is redrawn from its ``.npz``; a result of an earlier ``--save png``
   run has no maps kept, so it is explained again to be drawn (once: it was not explained in step 2);
4. rank 0 gathers the records and rewrites ``OUT/index.jsonl``, one line per input.

A result's files are placed together (:class:`~guided_swap.app.results.Together`): with the shared scale, the
``.npz`` of a result replacing an earlier pair waits in a hidden temporary until its figure is drawn. A write
that fails is that input's failed record. Ctrl-C (or SIGTERM) stops after the current batch; what was written
stays, and the same command finishes the job. An error after writing began stops the run with
:class:`~guided_swap.core.errors.RunError` (exit status 1), after rank 0 writes the index from what the files hold.
A killed process leaves only hidden temporaries, removed by the next run, and its writer processes end with it.
"""
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from .._files import part_name, remove_if_present, remove_stale_parts
from .._version import __version__
from . import distributed
from . import results
from .decoding import Decoded, loader
from ..capture.graph.layers import input_spec
from ..core.errors import CommandError, GuidedSwapError, RunError, ZeroGradientWarning
from ..core.maps import listing
from ..core.rules import rules
from ..media.viz import printable
from ..run.convert import convert
from ..run.smoothing import DEFAULT_NOISE
from .model_spec import Preprocessing, Source, build, sha256_text
from .results import Item, Plan, Together
from .writing import (CAM_METHODS, SMOOTHING_SEED, Writers, draw_saved, explain_batch, figure_context, figure_names,
                      shared_limits, uses_layer, zero_panels)

INTERRUPTED = "not explained: the run was interrupted; run the same command again to finish"
NO_FIGURE = "figure not drawn: the run was interrupted; run the same command again to finish"
NOT_REPLACED = ("not replaced: the run was interrupted before its figure was drawn, so its earlier result is kept "
                "whole; run the same command again to finish")


def rule_names() -> List[str]:
    """The backprop rules the library knows: every registered rule."""
    return list(rules())


def method_names() -> List[str]:
    return rule_names() + list(CAM_METHODS)


def rule_of(method: str) -> str:
    return CAM_METHODS.get(method, method)


class Quiet(Exception):
    """An error another rank reports; this rank exits without printing it, with the exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def exit_code(error: BaseException) -> int:
    """The exit status of an error that stopped a command: 2 for a usage error (nothing written), else 1."""
    return 2 if isinstance(error, (CommandError, ValueError, TypeError)) and not isinstance(error, RunError) else 1


@dataclass
class Job:
    """Everything one ``explain`` run needs, checked by the command line."""

    inputs: Sequence[str]
    out: str
    source: Source
    method: str = "all"
    layer: str = "auto"
    target: Optional[int] = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: Optional[List[str]] = None
    save: Tuple[str, ...] = ("npz", "png")
    cmap: str = "jet"
    scale: str = "shared"
    batch_size: int = 8
    workers: int = 0
    writers: int = 0
    force: bool = False
    device: str = "auto"
    report: bool = False
    cams: Tuple[str, ...] = ()  # --cam: CAMs of guided_swap.cam_methods() saved (and drawn) besides Grad-CAM
    smooth: Optional[int] = None  # --smooth: SmoothGrad copies per input
    noise: Optional[float] = None  # --noise: their noise, a fraction of each input's value range

    def settings(self) -> Dict[str, Any]:
        """What makes a result what it is: recorded in each result and compared on a rerun."""
        p = self.preprocessing
        return results.normalised({
            "library": "guided_swap", "version": __version__, **self.source.settings(),
            "layer": self.layer if uses_layer(self.method) else None, "method": self.method,
            "rule": rule_of(self.method), "target": "auto" if self.target is None else self.target,
            "resize": p.resize, "size": p.crop, "mean": list(p.mean), "std": list(p.std),
            "labels_sha256": None if self.labels is None else sha256_text("\n".join(self.labels)),
            "cmap": self.cmap, "scale": self.scale, "cams": list(self.cams), "smooth": self.smoothing()})

    def smoothing(self) -> Optional[Dict[str, Any]]:
        if self.smooth is None:
            return None
        return {"copies": self.smooth, "noise": DEFAULT_NOISE if self.noise is None else self.noise,
                "seed": SMOOTHING_SEED}


def blank_maps(lines: Sequence[dict], shown: int = 3) -> Optional[str]:
    """One line naming the results with a map that is zero everywhere (:func:`~guided_swap.app.writing.zero_panels`),
    or None; such a map shows nothing though it looks like an answer."""
    blank = {line.get("name") or line["input"]: zero_panels(line) for line in lines if line.get("error") is None}
    blank = {name: panels for name, panels in blank.items() if panels}
    if not blank:
        return None
    kinds = ", ".join(sorted({panel for panels in blank.values() for panel in panels}))
    return (f"warning: {len(blank)} of {len(lines)} result(s) hold a map that is zero everywhere ({kinds}): "
            f"{listing(list(blank), shown)}. Such a map shows nothing. A gradient that is zero everywhere gives one "
            "(an untrained or zero-initialised head: torchvision's ViT starts its head at zero; a target that ignores "
            "the input), and so does a CAM whose layer holds only evidence against the class; each record's "
            "\"moments\" in index.jsonl has the map ranges")


def _say(message: str) -> None:
    """One line on stderr, whatever the file names in it hold (a newline, a byte that is not UTF-8: escaped)."""
    print(f"guided-swap: {printable(message)}", file=sys.stderr, flush=True)


def _plan(job: Job, settings: Dict[str, Any], done_kinds: Sequence[str]) -> Tuple[Plan, results.Lock]:
    """Find the inputs (checking the layout, reading only), take OUT's lock, then plan under it."""
    found = results.find(job.inputs, job.out)
    lock = results.Lock.take(job.out)
    try:
        plan = results.plan(found.items, job.out, settings, job.save, job.force, done_kinds)
    except BaseException:
        lock.release()
        raise
    plan.links, plan.renamed, plan.unlisted, plan.again = found.links, found.renamed, found.unlisted, found.again
    return plan, lock


def _prepare(job: Job, plan: Plan, settings, group) -> None:
    """Rank 0 makes OUT, removes what killed runs left (never a live process's temporaries: the lock keeps
    other runs out, and a temporary whose process still runs here is kept) and marks in the index the inputs
    this run makes (:func:`_mark_making`); the other ranks wait, then all write."""
    if group.main:
        results.prepare(job.out)
        remove_stale_parts(job.out, only_dead=True)
        _mark_making(job, plan, settings)
    distributed.broadcast(None, group)


MAKING = ("not explained yet: the run making it did not finish (killed, or its index could not be written); run "
          "the same command again to finish")


def _mark_making(job: Job, plan: Plan, settings) -> None:
    """``OUT/index.jsonl`` before any result is written: the inputs done and failed as planned, the others
    :data:`MAKING`. So a run killed with SIGKILL, or whose last index write fails, never leaves lines that
    describe results it replaced. Where even this cannot be written (a full disk), the old index goes."""
    lines = [plan.failed.get(i) or plan.done.get(i) or results.failure_record(item, settings, MAKING)
             for i, item in enumerate(plan.items)]
    try:
        results.write_index(job.out, lines)
    except OSError:
        remove_if_present(os.path.join(job.out, results.INDEX))


def _shared_plan(job: Job, settings: Dict[str, Any], group, done_kinds: Sequence[str]
                 ) -> Tuple[Plan, Optional[results.Lock]]:
    """Rank 0 takes OUT's lock (for every rank of the run) and plans; every rank gets the plan, or rank 0's error
    (raised everywhere, printed by rank 0)."""
    plan, error, lock = None, None, None
    if group.main:
        try:
            plan, lock = _plan(job, settings, done_kinds)
        except (GuidedSwapError, OSError) as caught:
            error = caught
    plan, message = distributed.broadcast((plan, None if error is None else (str(error), exit_code(error))), group)
    if error is not None:
        raise error
    if message is not None:
        raise Quiet(*message)
    return plan, lock


# --- the explainer -------------------------------------------------------------------------------------------

def build_explainer(job: Job, group, say: Callable[[str], None]):
    """Model, explainer on this rank's device, and the model's class count and input channels."""
    model = build(job.source, say=lambda m: say(f"warning: {m}"))
    channels = (input_spec(model) or (4, 3))[1]
    size = job.preprocessing.crop
    example = torch.zeros(1, channels, size, size)
    explainer = convert(model, layer=job.layer if uses_layer(job.method) else None, rule=rule_of(job.method),
                        example_input=example)
    explainer = explainer.to(group.device)
    with torch.no_grad():
        classes = explainer(example.to(group.device)).shape[-1]
    if job.labels is not None and len(job.labels) != classes:
        raise CommandError(f"{len(job.labels)} class names (--labels or the weights') but the model has {classes} "
                           "outputs")
    if job.target is not None and job.target >= classes:
        raise CommandError(f"--target {job.target} is not a class of this model: it has {classes} outputs "
                           f"(0..{classes - 1})")
    given, values = job.preprocessing.source == "--mean/--std", len(job.preprocessing.mean)
    if values not in (1, channels) and (given or values < channels):
        raise CommandError(f"--mean/--std have {values} values; the model takes {channels} channel(s): give one "
                           "value per channel, or one for all")
    return explainer, classes, channels


def summary(explainer, job: Job) -> str:
    """One line: the report's summary (what was swapped, the layer captured, what was left alone), and what
    it means when a rule that needs rectifiers found none."""
    report = explainer.report
    line = f"model {job.source.model or job.source.weights}: {report.summary()}"
    if not report.ordinary_rule and not report.swapped:
        line += f"; no rectifier found, so the {report.rule} map is a plain gradient"
    if report.hidden_in_leaves:
        line += f"; NOT swapped, inside leaf modules: {', '.join(report.hidden_in_leaves)}"
    return line


# --- the run -------------------------------------------------------------------------------------------------

class _StopFlag:
    def __init__(self):
        self.raised = False


@contextmanager
def stop_after_batch():
    """While inside: the first SIGINT/SIGTERM sets ``flag.raised``; a second one stops at once."""
    flag = _StopFlag()
    previous = {}

    def handler(number, frame):
        flag.raised = True
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _progress(total: int, group, what: str):
    desc = what if group.world == 1 else f"{what} (rank 0 of {group.world})"
    return tqdm(total=total, desc=desc, unit="img", disable=None if group.main else True, file=sys.stderr,
                dynamic_ncols=True)


@contextmanager
def sigterm_interrupts():
    """While inside (main thread only): SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so a run stopped before
    its first batch or after its last (building the model, writing the index) lets go of OUT and exits with 130;
    during the passes :func:`stop_after_batch` takes over."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(job: Job, say: Callable[[str], None] = _say) -> int:
    """Run ``job``; 0 when every input has its result, 1 when some could not be explained (each in the index
    with its reason) or an error stopped the run after it began writing (:class:`~guided_swap.core.errors.RunError`,
    raised), 130 when interrupted. Usage errors (:class:`~guided_swap.core.errors.CommandError`, ValueError,
    TypeError) are raised before anything is written."""
    with sigterm_interrupts():
        group = distributed.start(job.device)
        try:
            return _run(job, group, say if group.main else (lambda message: None))
        finally:
            distributed.stop(group)


def _stages(job: Job) -> Tuple[Tuple[str, ...], bool]:
    """What the explaining pass writes, and whether the figures wait for a drawing pass on one shared scale
    (they are then drawn from the maps this pass saved: the ``.npz``, else a hidden temporary)."""
    shared = job.scale == "shared" and "png" in job.save
    return tuple(kind for kind in job.save if not (shared and kind == "png")), shared


def _staged(job: Job, plan: Plan, indices, held: Optional[Dict[int, str]] = None, hold: bool = False):
    """How each input's files are written: all of one call's together (:class:`~guided_swap.app.results.Together`).
    With ``hold``, the ``.npz`` of a result that replaces files already there goes to a hidden temporary (added
    to ``held``), placed with its figure by the drawing pass; without, ``held``'s temporaries are placed with
    the figure written."""
    where = {plan.items[i]: i for i in indices}
    replacing = set(plan.replacing)

    def wrap(item: Optional[Item], work):
        index = where.get(item)
        if held is None or index is None:
            return Together(work)
        npz = results.output_paths(job.out, item, ("npz",))["npz"]
        if hold and index in replacing:
            held[index] = part_name(npz)
            return Together(work, hold={npz: held[index]})
        if not hold and index in held:
            return Together(work, ready={npz: held[index]})
        return Together(work)
    return wrap


def _pass(explainer, job: Job, plan: Plan, indices, settings, group, channels: int, kinds, limits, flag, what: str,
          stashed: Optional[Dict[int, str]] = None, held: Optional[Dict[int, str]] = None):
    """Explain ``indices`` (already this rank's share) and write their ``kinds`` of output; (records,
    interrupted). With ``stashed`` (a dict), their figure arrays also go to hidden temporaries, added to it;
    with ``held`` (a dict), the ``.npz`` of each result replacing files already there goes to a hidden temporary,
    added to it, until its figure is drawn (:func:`_staged`)."""
    records, interrupted = {}, False
    batches = loader(Decoded(plan.items, indices, job.preprocessing, channels), job.batch_size, job.workers)
    writers = Writers(job.writers, backlog=2 * job.batch_size,  # Ctrl-C waits for at most two batches' writes
                      wrap=_staged(job, plan, indices, held, hold=True))
    # explain's warning names samples of one batch; the run names the files once at its end (_finish)
    with _progress(len(indices), group, what) as bar, writers, warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroGradientWarning)
        batches = iter(batches)
        try:
            for batch in batches:
                made, kept = explain_batch(explainer, job, batch, plan.items, settings, group, writers, kinds,
                                           limits, stashed is not None)
                records.update(made)
                if stashed is not None:
                    stashed.update(kept)
                bar.update(len(batch))
                if flag.raised:
                    interrupted = True
                    break
        except RuntimeError as error:
            if not _stopped_with_workers(flag, error):
                raise
            interrupted = True
        finally:
            if flag.raised:
                _close_quietly(batches)
        writers.finish()
    _write_failures(writers, plan, indices, records, settings)
    return records, interrupted


def _close_quietly(batches) -> None:
    """Shut the decode workers down now, on a stop: workers the same SIGTERM ended would otherwise make torch's
    clean-up print "Exception ignored ... DataLoader worker is killed by signal" when the iterator goes."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        try:
            shutdown()
        except RuntimeError:  # torch's report of those workers' ends
            pass


def _stopped_with_workers(flag, error: RuntimeError) -> bool:
    """Whether ``error`` is torch's report of a decode worker that ended after this run was asked to stop: a
    SIGTERM sent to the whole process group (``timeout``, Slurm, ``kill -TERM -PGID``) ends the workers too, and
    the run stops as the signal asked, not as if a worker had failed."""
    if "DataLoader worker" not in str(error):
        return False
    # The group's SIGTERM may reach this process after its workers' ends are noticed (a loaded machine schedules
    # the dying workers first): give its handler a moment to run before calling the worker's end a failure.
    deadline = time.monotonic() + (2.0 if "Terminated" in str(error) else 0.0)
    while not flag.raised and time.monotonic() < deadline:
        time.sleep(0.05)
    return flag.raised


def _write_failures(writers: Writers, plan: Plan, indices, records: Dict[int, dict], settings) -> None:
    """The inputs whose result could not be written get a failed record with the reason (the run goes on)."""
    where = {plan.items[i]: i for i in indices}
    for item, reason in writers.failed.items():
        if item in where:
            records[where[item]] = results.failure_record(item, settings, reason)


@dataclass
class Drawing:
    """Rank 0's plan for the figures on the run's shared scale: the scale, the figures to draw from a file (by
    input index, the fingerprint of the record that file must carry) and those to explain again."""

    limits: Dict[str, List[float]]
    from_files: Dict[int, str]
    again: List[int]

    def __len__(self) -> int:
        return len(self.from_files) + len(self.again)


def _figures_to_draw(job: Job, plan: Plan, records: Dict[int, dict], settings) -> Drawing:
    """Rank 0: the scale shared by every result of the run, and the inputs whose figure is missing or was drawn
    on another scale (all of them when new results moved the scale). Each is drawn from its ``.npz`` when the
    run saves one, from the temporary pass one stashed, or else (a done result of a PNG-only run, whose maps
    were never kept) explained again."""
    good = [records[i] for i in sorted(records) if records[i]["error"] is None]
    drawing = Drawing(shared_limits(good, job.method, job.cams), {}, [])
    replacing = set(plan.replacing)  # their new .npz waits for the figure (held), so each is drawn
    for i in sorted(records):
        if records[i]["error"] is not None:
            continue
        old = results.read_record(results.output_paths(job.out, plan.items[i], ("png",))["png"])
        if i not in replacing and old is not None and old.get("limits") == drawing.limits \
                and _unlimited(old) == _unlimited(records[i]):
            continue  # the very figure of this result, on this scale
        if "npz" in job.save or i not in plan.done:  # this run saved its maps: in its .npz, or stashed
            drawing.from_files[i] = results.fingerprint(records[i])
        else:
            drawing.again.append(i)
    return drawing


def _unlimited(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "limits"}


def _draw(explainer, job: Job, plan: Plan, mine: Sequence[int], drawing: Drawing, stashed: Dict[int, str],
          held: Dict[int, str], settings, group, flag) -> Tuple[Dict[int, dict], bool]:
    """Draw the figures of ``mine`` from the maps a file holds (the ``.npz``, this rank's stash, removed once
    drawn, or the ``.npz`` held back, placed with its figure), each checked to carry the record rank 0 counted;
    (records, interrupted)."""
    records, interrupted = {}, False
    names = figure_names(job.method, job.cams)
    writers = Writers(job.writers, backlog=2 * job.batch_size, wrap=_staged(job, plan, mine, held))
    with _progress(len(mine), group, "drawing") as bar, writers:
        for done, index in enumerate(mine, 1):
            item = plan.items[index]
            path = stashed.get(index) or held.get(index) or results.output_paths(job.out, item, ("npz",))["npz"]
            rec, maps = results.read_saved(path, names)
            if rec is None or results.fingerprint(rec) != drawing.from_files[index]:
                records[index] = results.failure_record(item, settings, _changed(job, path))
            else:
                context = figure_context(explainer, job, rec.get("layers") or {})
                writers.submit(job, item, rec, maps, context, drawing.limits, stashed.get(index), work=draw_saved)
                records[index] = rec
            bar.update(1)
            if flag.raised and (done % job.batch_size == 0 or done == len(mine)):
                interrupted = done < len(mine)
                break
        writers.finish()
    _write_failures(writers, plan, mine, records, settings)
    return records, interrupted


def _changed(job: Job, path: str) -> str:
    where = path[len(job.out):].lstrip("/\\")
    return (f"figure not drawn: {where} changed during the run (another process writing into the same --out?); "
            "run the same command again")


def _run(job: Job, group, say) -> int:
    settings = job.settings()
    first, shared = _stages(job)
    plan, lock = _shared_plan(job, settings, group, first or job.save)
    try:
        if lock is not None and lock.note:
            say(f"warning: {lock.note}")
        return _run_planned(job, group, say, settings, plan, first, shared)
    finally:
        if lock is not None:
            lock.release()


def _announce(job: Job, plan: Plan, say) -> None:
    if plan.replaced:
        say(f"--force: replacing {plan.replaced} result(s) made with other settings")
    if plan.changed:
        say(f"{plan.changed} input(s) changed since their results were made: explaining them again")
    if plan.done:
        say(f"{len(plan.done)} of {len(plan.items)} input(s) already done with these settings in {job.out}: skipped")
    if plan.links:
        say(f"warning: {len(plan.links)} link(s) to folders not followed: {listing(plan.links, 3)}; to explain what "
            "one holds, give the folder it points to as an input")
    if plan.again:
        say(f"{len(plan.again)} input(s) are the same file as another (a link to it, or given twice), explained "
            f"once: {listing(plan.again, 3)}")
    if plan.unlisted:
        say(f"warning: {len(plan.unlisted)} folder(s) could not be read, so no image in them is explained: "
            f"{listing(plan.unlisted, 3)}")
    if plan.renamed:
        first = plan.items[plan.renamed[0]]
        say(f"{len(plan.renamed)} input(s) get result names of their own, shortened or tagged (too long for the file "
            "system, a result would be a folder other results go in, or a name is another's but for case or "
            f"Unicode normalisation): first {first.path} -> {first.name}; index.jsonl maps each input to its name")


def _run_planned(job: Job, group, say, settings, plan: Plan, first, shared) -> int:
    stash = shared and "npz" not in job.save
    _announce(job, plan, say)
    explainer, _, channels = build_explainer(job, group, say)
    _prepare(job, plan, settings, group)
    try:
        return _explain_all(job, group, say, settings, plan, first, shared, stash, explainer, channels)
    except Exception as error:  # noqa: BLE001 - after writing began, any error stops the run (exit status 1)
        done = _salvage(job, plan, settings, error) if group.main else None
        text = (str(error).strip().splitlines() or [""])[0]
        where = "" if done is None else f"; {done} of {len(plan.items)} input(s) done in {job.out} (see index.jsonl)"
        raise RunError(f"the run stopped: {type(error).__name__}: {text}{where}; what was written stays: run the same "
                       "command again to finish (--traceback shows where it stopped)") from error


def _explain_all(job: Job, group, say, settings, plan: Plan, first, shared, stash, explainer, channels) -> int:
    say(summary(explainer, job))
    if job.report and group.main:
        print(explainer.report)
    started = time.perf_counter()
    common = (explainer, job, plan)
    mine = distributed.shard(plan.todo, group)
    stashed: Dict[int, str] = {}
    held: Dict[int, str] = {}  # the .npz of results replacing a pair, placed with their figure
    try:
        with stop_after_batch() as flag:
            records, interrupted = _pass(*common, mine, settings, group, channels, first, None, flag, "explaining",
                                         stashed if stash else None, held if shared and "npz" in job.save else None)
            gathered = distributed.gather((records, interrupted), group)
            drawn: Optional[list] = None
            if shared:
                share = _draw_shared(common, mine, gathered, stashed, held, settings, group, channels, flag, say)
                for index in held:  # held back and never drawn (the run stopped first): the earlier pair stays
                    if records[index]["error"] is None and index not in share[0]:
                        share[0][index] = results.failure_record(plan.items[index], settings, NOT_REPLACED)
                drawn = distributed.gather(share, group)
    finally:
        for path in list(stashed.values()) + list(held.values()):  # those left when the run stopped before drawing
            remove_if_present(path)
    seconds = distributed.gather(time.perf_counter() - started, group)
    if not group.main:
        return 0
    return _finish(job, plan, settings, gathered, drawn, max(seconds), group, say)


def _salvage(job: Job, plan: Plan, settings, error: BaseException) -> Optional[int]:
    """Rank 0, after an error stopped the run: ``OUT/index.jsonl`` from what the files hold (a result with this
    run's settings and input, in every kind saved, is done; any other input says why not), so the index agrees
    with the results; the number done, or None if the index could not be written either."""
    text = (str(error).strip().splitlines() or [""])[0]
    reason = f"not explained: the run stopped ({type(error).__name__}: {text}); run the same command again to finish"
    lines = []
    for index, item in enumerate(plan.items):
        line = plan.failed.get(index) or plan.done.get(index) or _on_disk(job, item, settings)
        lines.append(line or results.failure_record(item, settings, reason))
    try:
        results.write_index(job.out, lines)
    except OSError:
        return None
    return len([line for line in lines if line["error"] is None])


def _on_disk(job: Job, item: Item, settings) -> Optional[dict]:
    """The record of ``item``'s result if every kind saved is there, made with these settings from the input as
    it is now; else None."""
    found = [results.read_record(path) for path in results.output_paths(job.out, item, job.save).values()]
    try:
        stamp = results.source_stamp(item.path)
    except OSError:
        return None
    if not found or any(r is None or r.get("settings") != settings or r.get("source") != stamp for r in found):
        return None
    return _unlimited(found[0])


def _draw_shared(common, mine, gathered, stashed, held, settings, group, channels, flag, say
                 ) -> Tuple[Dict[int, dict], bool]:
    """The drawing pass: rank 0 plans it (:func:`_figures_to_draw`); each rank draws, from files, the figures
    of the inputs it explained and its share of the done ones, and explains again those it must."""
    explainer, job, plan = common
    drawing = None
    if group.main and not any(interrupted for _, interrupted in gathered):
        drawing = _figures_to_draw(job, plan, _merged(plan, gathered), settings)
    drawing = distributed.broadcast(drawing, group)
    if drawing is None or not len(drawing):
        return {}, False
    say(f"drawing {len(drawing)} figure(s) on one colour scale shared by the {len(plan.items)} input(s)")
    explained, todo = set(mine), set(plan.todo)
    ours = [i for i in drawing.from_files if i in explained]
    ours += distributed.shard([i for i in drawing.from_files if i not in todo], group)
    records, interrupted = _draw(explainer, job, plan, ours, drawing, stashed, held, settings, group, flag)
    if drawing.again and not interrupted:
        again, interrupted = _pass(*common, distributed.shard(drawing.again, group), settings, group, channels,
                                   ("png",), drawing.limits, flag, "explaining again to draw")
        records.update(again)
    return records, interrupted


def _merged(plan: Plan, gathered) -> Dict[int, dict]:
    records: Dict[int, dict] = {**plan.done, **plan.failed}
    for share, _ in gathered:
        records.update(share)
    return records


def _finish(job: Job, plan: Plan, settings, gathered, drawn, seconds: float, group, say) -> int:
    """Rank 0: the index from every rank's records, the failures, one closing line."""
    records = _merged(plan, gathered)
    interrupted = any(flag for _, flag in gathered + (drawn or []))
    for share, _ in drawn or []:  # a figure that could not be drawn from its file
        records.update({i: r for i, r in share.items() if r["error"] is not None})
    if drawn is not None and interrupted:  # a result whose figure is still to draw is not done
        figured = {i for share, _ in drawn for i in share}
        records = {i: r if r["error"] is not None or i in figured or _has_figure(job, plan, i)
                   else results.failure_record(plan.items[i], settings, NO_FIGURE) for i, r in records.items()}
    lines = [records.get(i) or results.failure_record(item, settings, INTERRUPTED) for i, item in enumerate(plan.items)]
    results.write_index(job.out, lines)
    made = len([i for share, _ in gathered for i in share if lines[i]["error"] is None])  # and written
    failed = [r for r in lines if r["error"] is not None and r["error"] not in (INTERRUPTED, NO_FIGURE, NOT_REPLACED)]
    for record in failed:
        say(f"could not explain {record['input']}: {record['error']}")
    rate = f"{made / seconds:.1f} images/s" if seconds > 0 and made else "no images"
    where = f"{group.world} processes" if group.world > 1 else f"1 process, {job.workers} decode worker(s)"
    if interrupted:
        finished = len([line for line in lines if line["error"] is None])
        say(f"interrupted: stopped after the current batch; {finished} of {len(plan.items)} input(s) done in "
            f"{job.out}; run the same command again to finish")
        return 130
    blank = blank_maps(lines)
    if blank:
        say(blank)
    say(f"explained {made} image(s) in {seconds:.1f} s ({rate}, {where}) into {job.out}"
        + (f"; {len(plan.done)} already done" if plan.done else "")
        + (f"; {len(failed)} could not be explained (see {job.out}/index.jsonl)" if failed else ""))
    return 1 if failed else 0


def _has_figure(job: Job, plan: Plan, index: int) -> bool:
    return os.path.exists(results.output_paths(job.out, plan.items[index], ("png",))["png"])
