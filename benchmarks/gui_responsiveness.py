"""GUI responsiveness of the "Train M³HL" widget while it trains on the CPU.

Opens napari (run it under ``xvfb-run -a`` on a machine without a display),
opens the 10 x 216 x 256 phantom sample (2 painted slices) as File ▸ Open
Sample does, docks the widget from the plugin manifest and clicks Train
(a mouse click on the button, as a user) with the GUI defaults for ``--iterations`` steps:
by default the few-slice fine-tune of the shipped model (its own input size, batch 8,
a preview of the start model's segmentation, then one at each check); with
``--start scratch`` the M³HL run (256 x 256 patches, batch 8 on the CPU,
pseudo-label and mix previews every 5 s).
A 10 ms ``QTimer`` probe in the GUI thread records the gaps between its
ticks: a gap much longer than 10 ms is a stall of the event loop (the user
would feel the viewer freeze). Measured:

* the longest gap and the 99th percentile, idle (before Train) and while
  training (from the return of Train's click handler until the segmentation
  is shown), with the GUI thread's own CPU time in the long gaps (the rest
  of a gap it waited: for a CPU core, or for the GIL held by the worker);
* how long Train's click handler takes (it validates, copies the layer data
  and adds the overlay layers);
* the time from pressing Train to the first step, to the first pseudo-label
  overlay, to the final segmentation written into its layer, and to the
  worker idle again (the jobs the result starts: clinical measures, slice
  suggestions).
* from the click to the worker idle: CPU seconds of the GUI thread, the
  process and the machine, the share of the cores left idle (``/proc/stat``)
  and the busiest threads of the process (``/proc/self/task``: the worker's
  torch threads, the GUI thread, Mesa's llvmpipe render threads).

Writes ``benchmarks/results/gui_responsiveness.json`` and prints a markdown
table.

    xvfb-run -a .venv/bin/python benchmarks/gui_responsiveness.py [--iterations 40]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "gui_responsiveness.json"


class Probe:
    """Records the gaps between the ticks of a 10 ms QTimer in the GUI thread."""

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import QTimer

        self.interval_ms = interval_ms
        # (time of tick, gap since previous tick, GUI-thread CPU time in that gap), seconds
        self.gaps: list[tuple[float, float, float]] = []
        self._last = None
        self._last_cpu = 0.0
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if self._last is not None:
            self.gaps.append((now, now - self._last, cpu - self._last_cpu))
        self._last, self._last_cpu = now, cpu

    def start(self) -> None:
        self._last = None
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def stats(self, t0: float, t1: float) -> dict[str, float]:
        sel = [(gap, cpu) for t, gap, cpu in self.gaps if t0 <= t <= t1]
        if not sel:
            return {"ticks": 0}
        g = np.array([gap for gap, _ in sel])
        c = np.array([cpu for _, cpu in sel])
        long = g > 0.1
        return {
            # share of the long stalls' wall time that the GUI thread itself computed;
            # the rest it waited (for the CPU, which other processes and the worker share, or the GIL)
            "gui_cpu_share_in_stalls_over_100ms": (
                round(float(c[long].sum() / g[long].sum()), 2) if long.any() else None
            ),
            "ticks": int(g.size),
            "max_ms": round(float(g.max()) * 1e3, 1),
            "p99_ms": round(float(np.percentile(g, 99)) * 1e3, 1),
            "median_ms": round(float(np.median(g)) * 1e3, 1),
            "over_100ms": int((g > 0.1).sum()),
            "over_50ms": int((g > 0.05).sum()),
        }


def wait_until(cond, timeout_s: float, check_ms: int = 20) -> bool:
    """Run Qt's event loop (as napari's own ``app.exec()`` does) until ``cond()`` or the timeout,
    checking every ``check_ms``. The GUI thread sleeps inside Qt between events and checks, as it
    does for a user, rather than taking the GIL hundreds of times a second in a Python loop of
    ``processEvents`` and short sleeps (which measured the same times, docs/benchmarks.md)."""
    from qtpy.QtCore import QEventLoop, QTimer

    if cond():
        return True
    end = time.perf_counter() + timeout_s
    loop, timer = QEventLoop(), QTimer()
    timer.setInterval(check_ms)
    timer.timeout.connect(lambda: loop.quit() if cond() or time.perf_counter() >= end else None)
    timer.start()
    loop.exec()
    timer.stop()
    return cond()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2,
                        help="Train presses in a row: the first adds the overlay layers, "
                             "later ones update them in place")
    parser.add_argument("--probe-ms", type=int, default=10,
                        help="the GUI-thread probe's timer period (its own wake-ups take a core from training "
                             "for a moment: a longer period measures training time with less of that)")
    parser.add_argument("--idle-s", type=float, default=3.0, help="probe the idle viewer this long first")
    parser.add_argument("--start", choices=("default", "scratch"), default="default",
                        help="default: the panel's start (fine-tune the shipped model: the few-slice loop, "
                             "which keeps the model's input size, so --patch does not apply); scratch: the "
                             "M³HL run from scratch")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="do not freeze the garbage collector after the warm-up (the widget does by default)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    import napari
    import torch

    from napari_m3hl._napari.run import jobs as _jobs
    from napari_m3hl._napari.layers import control as lc
    from napari_m3hl._napari.run.jobs import fewslice_cpu_threads, gui_cpu_threads
    from napari_m3hl._napari._widget import M3HLWidget
    from napari_m3hl.training.events import Progress

    from npe2 import PluginManager, PluginManifest
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    pm = PluginManager.instance()
    if "napari-m3hl" not in pm._manifests:  # not installed with its entry point
        pm.register(PluginManifest.from_file(Path(__file__).resolve().parents[1] / "napari.yaml"))
    _jobs.FREEZE_GC = not args.no_gc_freeze
    gc_pauses: list[tuple[float, int, float]] = []  # (end time, generation, seconds) of each collection

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            on_gc.t0 = time.perf_counter()
        else:
            gc_pauses.append((time.perf_counter(), info["generation"], time.perf_counter() - on_gc.t0))

    gc.callbacks.append(on_gc)
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1300, 900)
    viewer.open_sample("napari-m3hl", "cardiac_phantom")  # File ▸ Open Sample
    _, widget = viewer.window.add_plugin_dock_widget("napari-m3hl", "Train M³HL")
    assert isinstance(widget, M3HLWidget)
    viewer.dims.set_current_step(0, 5)
    if args.start == "scratch":
        widget.model_panel.start_combo.setCurrentIndex(0)
    widget.st.config_overrides = {"iterations": args.iterations, "batch_size": args.batch_size,
                               "patch_size": (args.patch, args.patch),
                               "block_size": (args.patch // 4, args.patch // 4)}
    widget.st.preview_every_s = 5.0
    widget.st.mix_preview_every_s = 5.0
    wait_until(lambda: False, 1.0)  # let the window settle
    wait_until(lambda: not widget.runner.busy, 120)  # the warm-up job the widget starts when it opens

    probe = Probe(args.probe_ms)
    probe.start()
    t_idle = time.perf_counter()
    wait_until(lambda: False, args.idle_s)
    idle = probe.stats(t_idle, time.perf_counter())

    handler_s: dict[str, list[float]] = {}
    event_times: list[tuple[str, float]] = []
    first_step: list[float] = []
    original = widget.run_view.on_event

    def timed(e) -> None:  # GUI-thread time spent drawing each kind of event
        t = time.perf_counter()
        if isinstance(e, Progress) and not first_step:
            first_step.append(t)
        original(e)
        handler_s.setdefault(type(e).__name__, []).append(time.perf_counter() - t)
        if not isinstance(e, Progress):
            event_times.append((type(e).__name__, t))

    widget.run_view.on_event = timed
    written: list[float] = []  # when 'M³HL segmentation' was written (the user sees the result)
    show = widget.st.outputs.show_segmentation

    def timed_show(*a, **k) -> None:
        show(*a, **k)
        written.append(time.perf_counter())

    widget.st.outputs.show_segmentation = timed_show

    def run_once() -> dict:
        handler_s.clear()
        event_times.clear()
        first_step.clear()
        written.clear()
        widget.run = None
        load_before = os.getloadavg()[0]
        (busy0, idle0), threads0 = cpu_times_s(), thread_cpu_s()
        cpu0 = time.thread_time(), time.process_time(), busy0
        t_press = time.perf_counter()
        QTest.mouseClick(widget.run_panel.train_btn, Qt.LeftButton)
        t_started = time.perf_counter()  # Train's click handler returned (overlay layers ready)
        assert widget.run is not None, widget.last_error
        wait_until(lambda: widget.run.finished is not None and not widget.runner.busy
                   and lc.SEGMENTATION in viewer.layers and bool(written), 120 + args.iterations * 10)
        t_end = time.perf_counter()  # also the jobs the result starts (clinical measures, slice suggestions)
        (busy1, idle1), threads1 = cpu_times_s(), thread_cpu_s()
        cpu1 = time.thread_time(), time.process_time(), busy1
        busiest = sorted(((c - threads0.get(tid, (n, 0.0))[1], n) for tid, (n, c) in threads1.items()), reverse=True)
        wait_until(lambda: False, 1.0)
        t_drawn = t_end + 0.5  # the segmentation layer's first draw comes in the turns after it is added
        fin = widget.run.finished
        r = {
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "iterations": fin.iteration if fin else None,
            "train_click_handler_ms": round((t_started - t_press) * 1e3, 1),
            "stalls": probe.stats(t_started, t_end),
            # the same from the click itself until 0.5 s after the segmentation layer was added
            # (its first draw): includes the click handler's own time
            "stalls_from_click": probe.stats(t_press, t_drawn),
            "longest_stalls": [
                {"t_s": round(t - t_press, 2), "gap_ms": round(gap * 1e3, 1), "gui_cpu_ms": round(cpu * 1e3, 1)}
                for t, gap, cpu in sorted((g for g in probe.gaps if t_press <= g[0] <= t_drawn),
                                          key=lambda g: -g[1])[:6]
            ],
            # the garbage collector's full collections in the window (they hold the GIL: a stall)
            "gc_gen2": [{"t_s": round(t - t_press, 2), "ms": round(d * 1e3, 1)}
                        for t, g, d in gc_pauses if g == 2 and t_press <= t <= t_drawn],
            "events_s": sorted((round(t - t_press, 2), k) for k, t in event_times),
            "train_to_first_step_s": round(first_step[0] - t_press, 2) if first_step else None,
            "train_to_first_pseudo_labels_s": (
                round(widget.run.first_preview_s, 2) if widget.run.first_preview_s else None
            ),
            # the click to the segmentation written into its layer, and to the worker idle again
            "train_to_segmentation_s": round(written[0] - t_press, 2),
            "train_to_idle_s": round(t_end - t_press, 2),
            # CPU seconds from the click to the worker idle: the GUI thread's (event loop, drawing),
            # this process's (GUI thread + worker's torch threads + any render threads) and the whole
            # machine's busy time (also the X server and everything else running)
            "cpu_s": {"gui_thread": round(cpu1[0] - cpu0[0], 2), "process": round(cpu1[1] - cpu0[1], 2),
                      "machine": round(cpu1[2] - cpu0[2], 2)},
            # the cores' idle share from the click to the worker idle: on an otherwise idle machine,
            # time in which waiting torch threads slept rather than spun (OpenMP's wait policy decides
            # which; with OMP_WAIT_POLICY=ACTIVE it is near 0 at the same speed, docs/benchmarks.md)
            "machine_idle_share": round((idle1 - idle0) / ((os.cpu_count() or 1) * (t_end - t_press)), 3),
            # the busiest threads of this process in that window, among those alive at its end: (CPU s, name)
            "busiest_threads_cpu_s": [(round(c, 2), n) for c, n in busiest[:6]],
            "s_per_iteration": (round((t_end - first_step[0]) / max(fin.iteration, 1), 3)
                                if fin and first_step else None),
            "gui_handler_ms": {k: {"n": len(v), "max": round(max(v) * 1e3, 1),
                                   "mean": round(float(np.mean(v)) * 1e3, 1)} for k, v in handler_s.items()},
        }
        return r

    runs = [run_once() for _ in range(args.runs)]
    probe.stop()
    result = {
        "benchmark": "gui_responsiveness",
        "volume": list(viewer.layers["phantom image"].data.shape),
        "batch_size": args.batch_size,
        "patch": [args.patch, args.patch],
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads_training": fewslice_cpu_threads() if widget.model_panel.plan().fewslice else gui_cpu_threads(),
        "torch": torch.__version__,
        "napari": napari.__version__,
        "qt_api": os.environ.get("QT_API", "pyqt5"),
        "platform": platform.platform(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "start": widget.model_panel.start_combo.currentText(),
        "fewslice": bool(widget.model_panel.plan().fewslice),
        "start_file": widget.model_panel.start_path.text() if widget.model_panel.start_combo.currentIndex() else None,
        "variant": widget.model_panel.variant_combo.currentText(),
        "gc_freeze": _jobs.FREEZE_GC,
        "probe_ms": args.probe_ms,
        "idle": idle,
        "runs": runs,
    }
    widget.cleanup()
    viewer.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def cpu_times_s() -> tuple[float, float]:
    """(busy, idle) seconds of all cores since boot (/proc/stat: idle counts iowait too; NaN elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / tick, idle / tick


def thread_cpu_s() -> dict[str, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of this process by thread id, with its name
    (/proc/self/task; empty elsewhere): the worker's torch threads, the GUI thread, Mesa's
    llvmpipe render threads (software OpenGL under Xvfb)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        rest = stat[stat.rindex(")") + 2:].split()
        out[tid] = (stat[stat.index("(") + 1:stat.rindex(")")], (int(rest[11]) + int(rest[12])) / tick)
    return out


def table(r: dict) -> str:
    runs = r["runs"]

    def row(name: str, fn) -> str:
        return f"| {name} | " + " | ".join(str(fn(x)) for x in runs) + " |"

    head = "| measure | " + " | ".join(
        "first Train (adds overlay layers)" if i == 0 else f"Train #{i + 1} (in place)" for i in range(len(runs))
    ) + " |"
    lines = [
        f"Volume {' × '.join(str(s) for s in r['volume'])}, batch {r['batch_size']}, patch {r['patch'][0]}², "
        f"start: {r['start']}{' ' + Path(r['start_file']).name if r['start_file'] else ''}, "
        f"variant {r['variant']}, "
        f"{r['cpu_count']} cores, {r['torch_threads_training']} torch thread(s) for training, "
        f"load average {r['load_average_1min_at_end']} at the end; idle GUI: longest gap "
        f"{r['idle'].get('max_ms')} ms (p99 {r['idle'].get('p99_ms')} ms) for a {r.get('probe_ms', 10)} ms timer.",
        "",
        head,
        "|---|" + "---|" * len(runs),
        row("iterations", lambda x: x["iterations"]),
        row("Train click handler", lambda x: f"{x['train_click_handler_ms']} ms"),
        row("load average (1 min) at Train / at the end", lambda x: " / ".join(map(str, x["load_average_1min"]))),
        row("longest GUI stall, click → segmentation", lambda x: f"{x['stalls_from_click'].get('max_ms')} ms"),
        row("longest GUI stall while training", lambda x: f"{x['stalls'].get('max_ms')} ms"),
        row("p99 / median tick gap", lambda x: f"{x['stalls'].get('p99_ms')} / {x['stalls'].get('median_ms')} ms"),
        row("stalls > 100 ms / > 50 ms", lambda x: f"{x['stalls'].get('over_100ms')} / {x['stalls'].get('over_50ms')}"),
        row("full GC collections (ms)", lambda x: ", ".join(str(g["ms"]) for g in x.get("gc_gen2", [])) or "none"),
        row("GUI-thread CPU share of stalls > 100 ms",
            lambda x: x["stalls"].get("gui_cpu_share_in_stalls_over_100ms")),
        row("Train → first step", lambda x: f"{x['train_to_first_step_s']} s"),
        row("Train → first pseudo-label overlay", lambda x: f"{x['train_to_first_pseudo_labels_s']} s"),
        row("Train → segmentation layer", lambda x: f"{x['train_to_segmentation_s']} s"),
        row("Train → worker idle (clinical measures, slice suggestions done)",
            lambda x: f"{x['train_to_idle_s']} s" if "train_to_idle_s" in x else "-"),
        row("s / iteration (incl. previews)", lambda x: x["s_per_iteration"]),
        row("cores idle, click → worker idle", lambda x: f"{100 * x['machine_idle_share']:.0f} %"
            if "machine_idle_share" in x else "-"),
        row("busiest threads (CPU s)", lambda x: ", ".join(f"{n} {c}" for c, n in x["busiest_threads_cpu_s"][:4])
            if "busiest_threads_cpu_s" in x else "-"),
        row("CPU s click → worker idle: GUI thread / process / machine",
            lambda x: " / ".join(str(x["cpu_s"][k]) for k in ("gui_thread", "process", "machine"))
            if "cpu_s" in x else "-"),
    ]
    for kind in ("Progress", "MixPreview", "VolumePreview", "PreviewQuality"):
        lines.append(row(f"GUI handler {kind}: max (mean)",
                         lambda x, k=kind: (f"{x['gui_handler_ms'][k]['max']} ({x['gui_handler_ms'][k]['mean']}) ms"
                                            if k in x["gui_handler_ms"] else "-")))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
