"""Thread workers for the widget's jobs, and the words for their errors.

:func:`start_worker` runs a job of :mod:`napari_m3hl._napari.run.jobs` in a superqt thread worker
(a generator job in a :class:`~superqt.utils.GeneratorWorker`, a function
in a :class:`~superqt.utils.FunctionWorker`) with GUI-thread callbacks.
A ``RuntimeError`` raised by a generator job is wrapped (:class:`JobError`)
so that it reaches ``errored``; :func:`describe_error` turns any failure
into one clear sentence for a napari notification (bad input, device out
of memory, divergence, anything else with the checkpoint that is left).
"""
from __future__ import annotations

import errno
import functools
import inspect
from typing import Any, Callable, Iterator, Sequence

from napari_m3hl.errors import M3HLInputError

Handler = Callable[..., Any]

class JobError(Exception):
    """A ``RuntimeError`` raised in a generator job, re-raised as a plain
    ``Exception``: superqt's ``GeneratorWorker`` treats a ``RuntimeError``
    from the generator as "worker deleted" and drops it (no ``errored``, no
    ``finished``), and torch reports most failures, device out-of-memory
    included, as ``RuntimeError``. ``original`` is the exception raised."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{original.__class__.__name__}: {original}")
        self.original = original


def guarded(func: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Wrap a generator job so that its ``RuntimeError`` reaches ``worker.errored``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            return (yield from func(*args, **kwargs))
        except RuntimeError as exc:
            raise JobError(exc) from exc

    return wrapper


def unwrap_error(exc: BaseException) -> BaseException:
    """The exception a job raised (see :class:`JobError`)."""
    return exc.original if isinstance(exc, JobError) else exc


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device (CUDA/MPS) or host allocation failure."""
    exc = unwrap_error(exc)
    oom = getattr(__import__("torch"), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def describe_error(exc: BaseException, what: str = "Training", batch_size: int | None = None,
                   checkpoint: str | None = None) -> str:
    """One clear sentence (or two) for a failure in a worker."""
    exc = unwrap_error(exc)
    if is_out_of_memory(exc):
        if batch_size and batch_size > 4:
            hint = f"Lower the batch size (now {batch_size}; try {max(4, batch_size // 2 // 4 * 4)}) or the patch size"
        elif batch_size:
            hint = f"The batch size is already the smallest (now {batch_size}); lower the patch size"
        else:
            hint = "Lower the batch size or the patch size"
        return (
            f"{what} ran out of device memory. {hint} in Advanced, or choose device 'cpu'. "
            "Your layers are unchanged."
        )
    if isinstance(exc, M3HLInputError):
        return str(exc)
    if isinstance(exc, FloatingPointError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"{what} failed: the disk is full (no space left on the device). Free some space or choose a "
                "folder on another disk, then try again; files are written whole or not at all, so what was there "
                "before is intact. Your layers are unchanged.")
    left = f" The last checkpoint is {checkpoint}." if checkpoint else ""
    return f"{what} failed: {exc.__class__.__name__}: {exc}. Your layers are unchanged.{left}"


def _notify_error(exc: BaseException) -> None:
    """Default ``errored`` handler: a clear napari notification."""
    from napari.utils import notifications

    notifications.show_error(describe_error(exc, "A background job"))


_POOL = None


def job_pool():
    """The plugin's own thread pool (a ``QThreadPool``, made on first use).

    Not Qt's global pool: Qt converts large images for the window's backing
    store in parallel on the global pool and the GUI thread waits for that,
    holding the GIL. With our long jobs filling the global pool (it has as
    many threads as cores: 2 on a small machine) while they wait for the GIL,
    a repaint of a shown window dead-locked napari. Its threads leave as soon
    as they have no job (expiry 0)."""
    global _POOL
    if _POOL is None:
        from qtpy.QtCore import QThreadPool

        _POOL = QThreadPool()
        _POOL.setMaxThreadCount(8)
        # A thread leaves as soon as it has no job: an idle thread would keep
        # the OpenMP team of its last torch job (see jobs.torch_threads), and
        # libgomp throttles every team's spin-wait while more team threads
        # exist than cores (the next Train on 2 cores ran 15 % slower).
        _POOL.setExpiryTimeout(0)
    return _POOL


def start_worker(func: Callable, *args: Any, connect: dict[str, Handler],
                 on_finished: Sequence[Callable[[Any], Any]] = (), start: bool = True, **kwargs: Any):
    """Start ``func(*args, **kwargs)`` in a thread worker of :func:`job_pool`
    with ``connect`` handlers (signal name → GUI-thread callback; ``errored``
    defaults to a notification) and ``on_finished`` callbacks (called with
    the worker when it finished). Returns the started worker (``start``
    False: the worker, to be started with ``job_pool().start(worker)``).

    superqt's worker classes are used directly (not napari's, which would add
    a traceback notification of their own to our ``errored`` handler).
    """
    from superqt.utils import FunctionWorker, GeneratorWorker

    if inspect.isgeneratorfunction(func):
        worker = GeneratorWorker(guarded(func), *args, **kwargs)
    else:
        worker = FunctionWorker(func, *args, **kwargs)
    for handler in on_finished:  # first, and before the start: a quick job may finish at once
        worker.finished.connect(functools.partial(handler, worker))
    connect = dict(connect)
    connect.setdefault("errored", _notify_error)
    for name, handler in connect.items():
        getattr(worker, name).connect(handler)
    if start:
        job_pool().start(worker)  # a superqt worker is a QRunnable
    return worker


def await_workers(msecs: int) -> bool:
    """Wait up to ``msecs`` for the jobs of :func:`job_pool` to finish; True when all did."""
    return bool(job_pool().waitForDone(msecs))
