"""Writing result files so that a kill mid-write leaves the previous file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """A binary file handle for `path` that becomes `path` only when the block ends without error: the bytes
    go to a temp file in the same folder, are flushed to disk, and the temp file is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would have
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see atomic_file): a kill mid-write leaves the previous file."""
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, written as write_bytes_atomic does (newlines as given, on every platform)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but a kill mid-write leaves the previous checkpoint whole.

    Lightning's own save moves a file from the system's temp folder into place, which is only a
    rename (atomic) when that folder is on the run folder's filesystem; this one writes beside the
    target, fsyncs and renames. Remote paths (s3://, ...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write (kill -9)
            stale.unlink(missing_ok=True)
        with atomic_file(path) as handle:  # straight to disk: no second copy of the checkpoint in memory
            torch.save(checkpoint, handle)
        return None
