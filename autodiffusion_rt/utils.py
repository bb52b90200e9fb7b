"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    A crash or an exception mid-write leaves the old file untouched and no partial file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
