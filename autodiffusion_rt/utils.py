"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator, Mapping

# The functions during which a command's SIGTERM or Ctrl-C waits (cli.run_command's handler looks for their frames).
INTERRUPT_DEFERRING_CODE: set = set()


def defer_interrupts(func):
    """Decorator: SIGTERM or Ctrl-C during ``func``, in a command :func:`autodiffusion_rt.cli.run_command` runs,
    waits until it returns. For native code that calls back into Python and mangles a KeyboardInterrupt raised
    there (pydantic-core turns it into a SchemaError), and for a temp file's creation and its rename or removal,
    which an interrupt between them would leave behind. A generator's frame counts only while it runs: a
    context manager's ``with`` body is not deferred."""
    INTERRUPT_DEFERRING_CODE.add(func.__code__)
    return func


@contextlib.contextmanager
@defer_interrupts
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    A crash or an exception mid-write leaves the old file untouched and no partial file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        set_default_mode(tmp)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    """``data`` as JSON (and a final newline) at ``path``, atomically (:func:`atomic_write`)."""
    import json

    with atomic_write(path, "w") as f:
        f.write(json.dumps(data, indent=indent) + "\n")


def remove_stale_temps(*paths: str | os.PathLike) -> list[Path]:
    """Delete the temp files :func:`atomic_write` leaves beside each of ``paths`` when its process is killed mid-write.

    Call it only holding the lock that serialises the writers of ``paths``: then every such file is a dead process's.
    """
    import glob

    removed = []
    for path in map(Path, paths):
        for f in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            try:
                f.unlink()
            except OSError:  # gone already, or a folder made read-only since: leaving it harms nothing
                continue
            removed.append(f)
    return removed


def set_default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain open() would (0644 under the usual umask).

    mkstemp makes files private (0600); files other accounts load (engines, plans,
    manifests: e.g. a service user) must not stay so.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class LockBusy(Exception):
    """Raised by :func:`file_lock` when another process holds the lock and ``wait`` is False."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = False, on_wait=None, remove: bool = False) -> Iterator[bool]:
    """Hold an exclusive fcntl lock on the file ``path`` (created if needed) for the ``with`` block.

    Another holder: block until it is done when ``wait`` (calling ``on_wait()``
    first, e.g. to say so), else raise :class:`LockBusy`. The lock dies with
    its process, so a ``kill -9`` never leaves a stale lock. Yields True, or
    False when ``path`` cannot be created (a read-only dir, in which no other
    process can write either): the caller proceeds unlocked. ``remove``: unlink
    the lock file on release (a process that locked the unlinked file checks
    the inode and retries on the new one, so two holders never coexist).
    """
    import fcntl

    path = Path(path)
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor too
            except OSError:
                yield False
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise LockBusy(str(path)) from None
            if on_wait is not None and not waited:
                on_wait()
            waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file: lock the current one
    try:
        yield True
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def locked_output_dir(
    lock: str | os.PathLike,
    dirs=(),
    *,
    error: type,
    busy: str,
    fix: str,
    wait: bool = False,
    on_wait=None,
    discard: bool = False,
) -> Iterator[bool]:
    """Make the missing ``dirs``, hold ``lock`` (:func:`file_lock`) for the block; on failure remove what was made.

    One writer per output (a build's engine dir, a search's ``--out``). A held ``lock`` raises ``error(busy)``
    unless ``wait``; a dir that cannot be made raises ``error`` naming it and ``fix``. Any exception from the
    block removes the dirs this call made (outermost last): empty ones only, or, with ``discard``, each
    listed dir with its contents (it holds only this writer's files). Yields what :func:`file_lock` yields.
    """
    made: list[Path] = []
    try:
        for target in map(Path, dirs):
            for d in reversed([d for d in (target, *target.parents) if not d.exists()]):
                try:
                    d.mkdir()
                except FileExistsError:
                    continue  # made meanwhile by another process: not ours to remove
                except OSError as e:
                    raise error(path_error(e, target, fix, "create", where=d)) from None
                made.append(d)
        try:
            with file_lock(lock, wait=wait, on_wait=on_wait, remove=True) as locked:
                yield locked
        except LockBusy:
            raise error(busy) from None
    except BaseException:
        listed = {Path(d) for d in dirs}
        for d in reversed(made):
            if discard and d in listed:
                import shutil

                shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def path_error(e: OSError, path, fix: str, action: str = "write", where=None) -> str:
    """One line for an OS error on ``path``: what happened and ``fix`` (what to do)."""
    import errno

    why = {
        errno.ENOSPC: "the disk is full",
        errno.EFBIG: "the file exceeds the size limit (ulimit -f) or the file system's",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.EISDIR: "it is a directory",
        errno.ENOENT: "no such file or directory",
        errno.ENAMETOOLONG: "the name is too long",
    }.get(e.errno, e.strerror or str(e))
    where = where or e.filename or path
    return f"cannot {action} {path}: {why} ({where}); {fix}"


def check_writable(path: str | os.PathLike, what: str, fix: str, error=None, directory: bool = False) -> Path:
    """Probe, before any long work, that ``path`` (a file, or a dir when ``directory``) can be written.

    Creates nothing that stays: missing parent dirs are not made here (a failed
    command must not leave empty folders); the nearest existing one is probed
    with a temp file, which is what counts when running as root or on a
    read-only mount. Raises ``error`` (an :class:`~autodiffusion_rt.errors.Error`
    subclass) with a one-line message naming the path and ``fix``.
    """
    from .errors import Error

    error = error or Error
    path = Path(path)
    if not directory and path.is_dir():
        raise error(f"{what} {path} is a directory: pass a file path; {fix}")
    if directory and path.exists() and not path.is_dir():
        raise error(f"{what} {path} is a file, not a directory; {fix}")
    probe_dir = path if directory and path.is_dir() else path.parent
    existing = next((p for p in [probe_dir, *probe_dir.parents] if p.exists() or p.is_symlink()), Path("."))
    if not existing.is_dir():
        raise error(f"cannot write {what} {path}: {existing} is a file, not a directory; {fix}")
    try:
        _probe_write(existing)
    except OSError as e:
        raise error(
            path_error(e, path, fix, where=existing).replace("cannot write", f"cannot write {what}", 1)
        ) from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise error(f"cannot write {what} {path}: the file is read-only; {fix}")
    return path


@defer_interrupts
def _probe_write(directory: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".probe-", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


def positive_ints(text: str) -> list[int]:
    """argparse ``type=``: a comma-separated list of positive integers (``1,16,256``)."""
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,16,256")
    return values


def print_report(report: dict, table, json_path: str | os.PathLike | None = None) -> None:
    """How the measuring commands (benchmark.py, its --serve load test) hand back a report.

    ``json_path`` ``"-"``: the JSON alone on stdout (for pipes). Otherwise
    ``table(report)`` (text) on stdout and, when ``json_path`` is given, the
    JSON also written there (atomically).
    """
    import json

    if json_path == "-":
        print(json.dumps(report, indent=2))
        return
    print(table(report))
    if json_path:
        write_json(json_path, report)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _kernels_package():
    try:  # optional fast paths; any failure to import just means "use torch"
        return importlib.import_module("kernels")
    except Exception:
        return None


def kernel_hook(name: str):
    """``kernels.<name>``: the one narrow door from the core to the optional Triton kernels.

    The hook, given a call's arguments, returns the kernel when it applies to them
    (else None). None here when the kernels package is missing or disabled with
    AUTODIFFUSION_RT_KERNELS=0.
    """
    if os.environ.get("AUTODIFFUSION_RT_KERNELS", "").strip().lower() in ("0", "false", "off", "no"):
        return None
    return getattr(_kernels_package(), name, None)


def weights_fingerprint(state_dict) -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes), independent of the file format."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def plain_warnings() -> None:
    """Command-line warnings as one line ("warning: ..."), without the library's source line."""
    import warnings

    def fmt(message, category, filename, lineno, line=None):
        return f"warning: {message}\n"

    warnings.formatwarning = fmt


def os_error_line(e: OSError) -> str:
    """The CLIs' last resort for an OS error no command turned into its own message."""
    where = f" {e.filename}" if e.filename else ""
    return f"cannot access{where}: {e.strerror or e}; check the path (and free space / permissions) and run again"


def import_pyplot(flag: str = "--plot"):
    """matplotlib.pyplot on the Agg backend, or a clear error naming ``flag`` and the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(f"{flag} needs matplotlib: pip install 'autodiffusion-rt[plot]'") from None
    return plt


def lazy_exports(package: str, table: Mapping[str, str]):
    """PEP 562 ``(__getattr__, __dir__)`` for ``package``, whose public names (``table``: name -> submodule) are
    imported on first use: importing one light submodule (a command's argument parser) then costs no torch."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
