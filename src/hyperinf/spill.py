"""Per-sample training gradients past the memory budget, written to disk in pass 1 and read back memory-mapped in pass 2.

Recomputing a batch's per-sample gradients costs a forward and a backward pass; reading them back
costs their size in disk reads, far less on the models measured (benchmarks/bench_spill.py,
docs/results.md). A :class:`GradientSpill` is one file in its own folder under the spill
directory, appended batch by batch in loader order; its index (byte offset and shape of every
block of every batch, the losses) stays in memory. The folder is deleted when the spill is closed
or garbage-collected, so it lives as long as the fit that wrote it; the folder of a process that
was killed (no clean-up ran) is removed by the next fit that spills to the same directory on the same host.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch

from hyperinf.errors import SpillWarning
from hyperinf.gradients import BatchGradients

SpillDtype = Literal["full", "bfloat16"]  # "full": the gradients' own dtype (read back bit-identical)

_PREFIX = "gradients-"  # then host, process id and a unique suffix: whose spill a folder is
_ALIGN = 8  # every block starts at a multiple of the widest element size, so a byte slice views as any dtype


@dataclass(frozen=True)
class _Entry:
    """Where one block of one batch lies in the file (byte offset, shape ``[B, ...]``, stored dtype) and what
    it was (dtype and device of the gradient, which reading gives back)."""

    offset: int
    shape: tuple[int, ...]
    stored: torch.dtype
    dtype: torch.dtype
    device: torch.device


class GradientSpill:
    """Per-sample gradients of a pass, batch by batch, in one file under ``directory`` (deleted with the object)."""

    def __init__(self, directory: str | Path, dtype: SpillDtype = "full") -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=directory))
        self.path = self.folder / "gradients.bin"
        self.dtype = dtype
        self.bytes = 0
        self._batches: list[tuple[torch.Tensor, dict[str, _Entry]]] = []
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - open across appends, closed by finish()
        self._cleanup = weakref.finalize(self, _remove, self._file, self.folder)

    def append(self, batch: BatchGradients) -> None:
        """Write one batch's gradients at the end of the file (its losses stay in memory)."""
        file = self._file
        if file is None:
            raise RuntimeError("the spill file is closed for writing: append every batch before finish()")
        entries = {}
        for name, g in batch.grads.items():
            stored = g.detach().to("cpu", torch.bfloat16 if self.dtype == "bfloat16" else g.dtype).contiguous()
            raw = stored.view(torch.uint8).numpy() if stored.numel() else np.empty(0, np.uint8)
            entries[name] = _Entry(self.bytes, tuple(stored.shape), stored.dtype, g.dtype, g.device)
            file.write(raw.data)  # the array's buffer, without a bytes copy
            padding = -raw.nbytes % _ALIGN
            file.write(bytes(padding))
            self.bytes += raw.nbytes + padding
        self._batches.append((batch.losses.detach(), entries))

    def finish(self) -> None:
        """Close the file for writing; the batches can then be read back."""
        if self._file is not None:
            self._file.close()
        self._file = None

    def read(self, skip: int = 0) -> Iterator[BatchGradients]:
        """The batches after the first ``skip``, as written, on the gradients' device (``"full"`` on CPU:
        bit-identical views of the mapped file; ``"bfloat16"``: converted back to the gradients' dtype)."""
        if self._file is not None:
            raise RuntimeError("the spill is still being written: call finish() first")
        for losses, entries in self._batches[skip:]:
            grads = {name: self._tensor(entry).to(entry.device, entry.dtype) for name, entry in entries.items()}
            yield BatchGradients(losses, grads)

    def _tensor(self, entry: _Entry) -> torch.Tensor:
        """One block of one batch, mapped on its own: the mapping (and its pages in this process's resident
        memory) goes when the tensor does, so reading a file larger than RAM keeps memory flat."""
        size = int(np.prod(entry.shape)) * entry.stored.itemsize
        if size == 0:
            return torch.empty(entry.shape, dtype=entry.stored)
        mapped = np.memmap(
            self.path, dtype=np.uint8, mode="c", offset=entry.offset, shape=(size,)
        )  # copy-on-write: file untouched
        return torch.from_numpy(mapped).view(entry.stored).view(entry.shape)

    def close(self) -> None:
        """Delete the file and its folder now (also done when the object is garbage-collected)."""
        self._cleanup()


def _remove(file: BinaryIO | None, folder: Path) -> None:
    if file is not None:
        file.close()
    shutil.rmtree(folder, ignore_errors=True)


def remove_orphans(directory: str | Path) -> list[Path]:
    """Delete the spill folders under ``directory`` left by processes of this host that no longer run; returns them."""
    removed = []
    host = socket.gethostname()
    for folder in Path(directory).glob(f"{_PREFIX}{host}-*"):
        pid = folder.name[len(_PREFIX) + len(host) + 1 :].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def room_for(directory: str | Path, needed_bytes: int) -> bool:
    """Whether ``directory``'s file system has ``needed_bytes`` free (with a 5% margin); warns when not."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if needed_bytes * 1.05 <= free:
        return True
    warnings.warn(
        f"not enough disk space in {directory} to spill the training gradients (about {needed_bytes / 2**30:.1f} GiB "
        f"needed, {free / 2**30:.1f} GiB free): pass 2 recomputes them instead. Free space there, point spill_dir "
        "elsewhere, or use spill_dtype='bfloat16' (half the size).",
        SpillWarning,
        stacklevel=4,
    )
    return False
