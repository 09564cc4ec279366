"""Outputs written atomically, and scratch space for dask tasks.

An output is written to a temporary sibling and renamed when complete, so a
failed step leaves nothing half-written; what a killed step left behind is
removed the next time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling of ``path``; rename it to ``path`` on success.

    On an exception the temporary file or folder is removed and ``path`` is
    left as it was, so a failed step leaves nothing half-written; what a
    killed step left (a ``.{name}.tmp-*`` sibling) is removed first.
    """
    path = Path(path).absolute()  # dask tasks may write into it from another working directory
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name.removesuffix(suffix)
    _remove_stale(path.parent, f".{stem}.tmp-*{suffix}")  # left by a step killed while writing it
    _remove_stale(path.parent, f"..{stem}.tmp-*")  # and what it built beside that (label images of a store)
    tmp = path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _remove_stale(folder: Path, pattern: str) -> None:
    """Remove what matches ``pattern`` in ``folder``: temporary files or folders of a killed step."""
    for stale in Path(folder).glob(pattern) if Path(folder).is_dir() else ():
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def on_distributed_cluster() -> bool:
    """Whether dask computes on a ``dask.distributed`` cluster here (its client is the scheduler)."""
    import dask.base

    try:
        from distributed import Client
    except ImportError:
        return False
    return isinstance(getattr(dask.base.get_scheduler(), "__self__", None), Client)


def scratch_dir(near: str | os.PathLike, *, prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary directory that dask tasks write to and read back from.

    On local disk (``$TMPDIR``) with the local schedulers; beside ``near``
    (an output's folder, on the filesystem the cluster shares) when the
    tasks run on a ``dask.distributed`` cluster, whose workers may sit on
    other nodes, where the client's ``$TMPDIR`` is not theirs. The path is
    absolute either way. Use it as a context manager, or call ``cleanup()``.
    """
    if not on_distributed_cluster():
        return tempfile.TemporaryDirectory(prefix=prefix)
    near = Path(near).absolute()
    near.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{prefix}", dir=near)
