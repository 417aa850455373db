"""Processes, devices and precisions for capture and SAE training (torchrun / ``accelerate launch``).

A launcher starts one process per device and describes the job in environment variables: torchrun (and
``accelerate launch``, which runs torchrun's launcher for multi-process jobs) set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`distributed_session` joins
that process group (gloo for CPU tensors, NCCL for CUDA ones) and picks this process's device, so the same
command runs alone or under a launcher. :class:`Dist` wraps the few collectives the capture and the trainer
need; with one process every call is a no-op, so the single-process path has no special case.

Objects travel between ranks as JSON in uint8 tensors, never pickled.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as tdist

from ..core.choices import PRECISIONS as PRECISIONS_LIST
from ..core.errors import DebiasError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS: dict[str, torch.dtype | None] = {name: _DTYPES[name] for name in PRECISIONS_LIST}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> "Dist":
        """The initialised default process group, or a single process when there is none."""
        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def _reduce(self, t: torch.Tensor, op: Any) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t, op=op)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (returns ``t``)."""
        return self._reduce(t, tdist.ReduceOp.SUM) if self.enabled else t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, tdist.ReduceOp.MAX) if self.enabled else t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, tdist.ReduceOp.MIN) if self.enabled else t

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every rank's ``t`` in rank order (all ranks pass the same shape)."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        device = _collective_device()
        size = torch.tensor([data.numel()], device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        tdist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:data.numel()] = data.to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        return [json.loads(bytes(p[:int(s.item())].cpu().tolist()).decode()) for p, s in zip(parts, sizes)]

    def broadcast_json(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass anything, e.g. ``None``)."""
        return self.gather_json(obj if self.is_main else None)[0] if self.enabled else obj

    def check_same(self, what: str, value: Any) -> None:
        """Refuse to go on when ranks disagree (e.g. each loaded other weights): one error on every rank."""
        values = self.gather_json(value)
        if any(v != values[0] for v in values):
            raise DebiasError(f"the {self.world_size} processes disagree on the {what} ({', '.join(map(str, values))}); "
                              "every rank must load the same model and inputs")


def _collective_device() -> torch.device:
    # NCCL-only groups move bytes between GPUs; mixed "cpu:gloo,cuda:nccl" groups (ours) take CPU tensors.
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` (this process's GPU when CUDA is there, else the CPU), ``cpu``, ``cuda`` (GPU ``LOCAL_RANK``
    under a launcher, else 0) or ``cuda:i``. Asking for CUDA where there is none is one-line error."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise DebiasError(f"unknown device {spec!r}; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise DebiasError(f"device {spec!r} asked for, but CUDA is not available ({why}); use --device cpu or auto")
    index = int(m.group(1)) if m.group(1) is not None else local_rank
    if index >= torch.cuda.device_count():
        raise DebiasError(f"device cuda:{index} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", index)


def check_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``fp32`` / ``bf16`` / ``fp16`` (``None``: plain fp32)."""
    if precision not in PRECISIONS:
        raise DebiasError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for matmuls on ``device`` (weights stay fp32); ``fp32``: nothing changes."""
    dtype = check_precision(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def launched_world_size() -> int:
    """``WORLD_SIZE`` as a launcher set it (1 when run directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise DebiasError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[tuple[Dist, torch.device]]:
    """Join the launcher's process group (if any) and pick this rank's device.

    Run directly (no ``WORLD_SIZE`` > 1) this is a single process and opens no group. The group, once opened,
    stays open for the process's later commands (a launcher's rendezvous cannot be joined twice) and is
    left at exit; a group that the caller initialised is used as it is.
    """
    world = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    dev = resolve_device(device, local_rank)
    if world > 1 and not tdist.is_initialized():
        missing = [v for v in LAUNCH_VARS if v not in os.environ]
        if missing:
            raise DebiasError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start multi-process runs with "
                              "torchrun or accelerate launch")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        atexit.register(_leave)
    yield Dist.current(), dev


def _leave() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
