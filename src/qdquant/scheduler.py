"""How a step computes: the config's ``dask`` section, progress bars and the chunk size.

Every ``qdquant <step>`` runs inside :func:`dask_scheduler` (once per step):
it sets the dask scheduler (``threads``, ``processes``, ``synchronous``, a
``dask.distributed`` client for an address, or one of a SLURMCluster the step
starts for ``dask.cluster: slurm``), the local schedulers' number of
workers (the config's ``dask.num_workers``, else the rule's ``--threads``),
and shows a progress bar on stderr (the rule's log) for every computation
that runs longer than :data:`PROGRESS_MIN_S` seconds. :func:`step_config`
then shrinks ``chunk_size`` to the memory the step was given (``--mem-mb``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from dataclasses import replace
from pathlib import Path
from timeit import default_timer

import dask
import dask.multiprocessing
from dask.diagnostics import ProgressBar

from qdquant.config import Config, chunk_size_for
from qdquant.errors import InputError

log = logging.getLogger("qdquant")

LOCAL_SCHEDULERS = ("threads", "processes", "synchronous")
#: A computation shorter than this (seconds) shows no progress bar; the
#: environment variable ``QDQUANT_PROGRESS_MIN_S`` overrides it (0: every one).
PROGRESS_MIN_S = 5.0
PROGRESS_MIN_ENV = "QDQUANT_PROGRESS_MIN_S"
#: Even when the percentage does not move, the bar is redrawn this often (s).
_HEARTBEAT_S = 60.0


def progress_minimum() -> float:
    """Seconds before a computation's progress bar shows (``QDQUANT_PROGRESS_MIN_S``, else the default)."""
    try:
        return max(float(os.environ.get(PROGRESS_MIN_ENV, PROGRESS_MIN_S)), 0.0)
    except ValueError:
        return PROGRESS_MIN_S


class StepProgress(ProgressBar):
    """dask's progress bar, fit for a log file.

    The bar is redrawn only when its percentage changes (or every minute), so
    a long computation writes at most about a hundred short updates into the
    step's log, and the timer thread stops as soon as the computation ends.
    Computations started inside tasks get no bar of their own (dask gives the
    registered callbacks to the outermost computation only).
    """

    def __init__(self, minimum: float = PROGRESS_MIN_S, out=None, dt: float = 1.0):
        super().__init__(minimum=minimum, dt=dt, out=sys.stderr if out is None else out)
        self._last = (None, 0.0)
        self._wake = threading.Event()

    def _start(self, dsk):
        self._last = (None, 0.0)
        self._wake = threading.Event()
        super()._start(dsk)

    def _finish(self, dsk, state, errored):
        self._running = False
        self._wake.set()  # end the timer thread now, not after its sleep
        super()._finish(dsk, state, errored)

    def _timer_func(self):
        while self._running:
            elapsed = default_timer() - self._start_time
            if elapsed > self._minimum:
                self._update_bar(elapsed)
            self._wake.wait(self._dt)

    def _draw_bar(self, frac, elapsed):
        percent, now = int(100 * frac), default_timer()
        if percent == self._last[0] and now - self._last[1] < _HEARTBEAT_S:
            return
        self._last = (percent, now)
        super()._draw_bar(frac, elapsed)


def _client(address: str, source: str):
    try:
        from distributed import Client
    except ImportError:
        raise InputError(
            f"{source}: key 'dask.scheduler': '{address}' is a dask.distributed address but the"
            " 'distributed' package is not installed (pip install distributed, or use threads)"
        ) from None
    try:
        return Client(address)
    except (OSError, TimeoutError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{source}: key 'dask.scheduler': cannot connect to '{address}' ({message})") from None


def _slurm_cluster(settings: dict, source: str):
    """A dask-jobqueue ``SLURMCluster`` of ``settings["jobs"]`` worker jobs (the config's ``dask.slurm``).

    Each job runs one dask worker with ``cores`` threads and ``memory``; the
    workers' scratch space is the job's ``$TMPDIR`` (else ``/tmp``) and their
    logs go to ``logs/dask-slurm/`` under the working directory. The step's
    process is the client (and the cluster's scheduler): it must reach the
    compute nodes over TCP.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise InputError(
            f"{source}: key 'dask.cluster': 'slurm' needs the 'dask-jobqueue' and 'distributed' packages"
            " (pip install 'qdquant[distributed]')"
        ) from None
    log_dir = Path("logs", "dask-slurm").absolute()
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = SLURMCluster(
        cores=int(settings["cores"]),
        processes=1,
        memory=settings["memory"],
        walltime=settings["walltime"],
        queue=settings.get("queue"),
        account=settings.get("account"),
        job_extra_directives=list(settings.get("job_extra_directives") or []),
        local_directory="$TMPDIR",
        log_directory=str(log_dir),
        scheduler_options={"dashboard_address": ":0"},  # any free port: several steps may share a login node
        job_script_prologue=['export TMPDIR="${TMPDIR:-/tmp}"'],
    )
    cluster.scale(jobs=int(settings["jobs"]))
    return cluster


@contextlib.contextmanager
def _slurm_client(settings: dict, source: str):
    """A client of a fresh SLURMCluster, once its first worker has started; both closed on exit."""
    from distributed import Client

    with _slurm_cluster(settings, source) as cluster, Client(cluster) as client:
        log.info("dask: SLURMCluster of %d job%s (%s cores, %s each), scheduler %s; dashboard %s",
                 settings["jobs"], "" if settings["jobs"] == 1 else "s", settings["cores"], settings["memory"],
                 cluster.scheduler_address, client.dashboard_link)
        try:
            client.wait_for_workers(1, timeout=float(settings["start_timeout_s"]))
        except TimeoutError:
            raise InputError(
                f"{source}: key 'dask.cluster': no SLURM worker job started within"
                f" {settings['start_timeout_s']:g} s (dask.slurm.start_timeout_s; see squeue and logs/dask-slurm/)"
            ) from None
        yield client


def _process_pool(n_workers: int):
    """One pool of worker processes for the whole step (dask would start one per computation)."""
    from concurrent.futures import ProcessPoolExecutor

    from dask.multiprocessing import get_context

    if os.environ.get("PYTHONHASHSEED") in (None, "0"):  # as dask does: the same hashing in every worker
        os.environ["PYTHONHASHSEED"] = "6640"
    return ProcessPoolExecutor(int(n_workers), mp_context=get_context())


@contextlib.contextmanager
def dask_scheduler(cfg: Config, *, threads: int | None = None, progress_min_s: float | None = None):
    """Compute with the config's ``dask`` scheduler inside this block; yield the local worker count.

    Parameters
    ----------
    cfg : Config
        Its ``dask`` section: ``scheduler`` and ``num_workers``.
    threads : int, optional
        The CPUs the step was given (the rule's ``threads``); the number of
        workers of the threads and processes schedulers when the config sets
        no ``num_workers``. Neither given: dask's default (the CPU count).
    progress_min_s : float, optional
        Seconds before a computation's progress bar shows (default:
        :func:`progress_minimum`).

    Yields
    ------
    int or None
        How many chunks the local scheduler computes at once (1 for
        ``synchronous``), or None for a distributed cluster, whose workers'
        memory is not this process's.

    Progress bars (on stderr) work with the local schedulers; a distributed
    client shows progress on its dashboard instead (its address is logged).
    """
    from dask.system import CPU_COUNT

    settings = cfg.dask
    scheduler = settings.scheduler
    minimum = progress_minimum() if progress_min_s is None else float(progress_min_s)
    with contextlib.ExitStack() as stack:
        if scheduler in LOCAL_SCHEDULERS and settings.cluster is None:
            workers = 1 if scheduler == "synchronous" else settings.num_workers or threads
            options = {"scheduler": scheduler}
            if workers is not None and scheduler != "synchronous":
                options["num_workers"] = int(workers)
            if scheduler == "processes":
                # dask's process scheduler on one pool for the step (not config "pool", which the
                # threads scheduler would take too where a computation asks for threads)
                pool = stack.enter_context(_process_pool(workers or CPU_COUNT))
                options["scheduler"] = functools.partial(dask.multiprocessing.get, pool=pool)
            stack.enter_context(dask.config.set(options))
            stack.enter_context(StepProgress(minimum=minimum))
            workers = int(workers or CPU_COUNT)
            log.info("dask: %s scheduler, %d worker%s", scheduler, workers, "" if workers == 1 else "s")
        elif settings.cluster == "slurm":
            stack.enter_context(_slurm_client(settings.slurm, cfg.source))
            workers = None
        else:
            client = stack.enter_context(_client(scheduler, cfg.source))
            workers = None
            log.info("dask: distributed scheduler %s; progress on its dashboard %s", scheduler,
                     getattr(client, "dashboard_link", "(none)"))
        yield workers


def step_config(cfg: Config, n_workers: int | None, mem_mb: float | None) -> Config:
    """The config with the chunk size the step uses (:func:`~qdquant.config.chunk_size_for`), logged.

    The estimate is the unmix step's (the heaviest) for the library's band
    count. Without ``mem_mb``, or on a distributed cluster (``n_workers``
    None: its workers' memory is not the step's), the configured size is kept.
    """
    n_bands = len(cfg.library.wavelengths_nm)
    used = cfg.chunk_size if n_workers is None else chunk_size_for(cfg.chunk_size, n_bands, n_workers, mem_mb)
    if used != cfg.chunk_size:
        log.info("chunk size %d px (config chunk_size %d does not fit mem_mb %s with %d worker%s x %d bands)",
                 used, cfg.chunk_size, mem_mb, n_workers, "" if n_workers == 1 else "s", n_bands)
        return replace(cfg, chunk_size=used)
    log.info("chunk size %d px", used)
    return cfg
