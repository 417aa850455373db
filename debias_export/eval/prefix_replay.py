"""Replay a tower's unedited blocks instead of recomputing them.

A selection grid scores dozens of edits on the same faces and prompts, and every edit at block ``b`` leaves
blocks ``0..b-1`` (and block ``b`` itself, for an edit on its output) exactly as the unmodified model ran
them. :class:`PrefixTrace` records, per batch, what each block of an unmodified run returned; while
:meth:`PrefixTrace.replaying` is active, those blocks return the recorded tensors instead of computing,
and the edit (a hook on block ``b``'s output, or a module inside block ``b+1``) and everything after it
run for real. The results are the recorded run's own tensors, so nothing changes but the time.

Replay only happens when it is exact; otherwise the block computes as usual:
- a batch is recognised by every tensor its first block receives (the embeddings' output, masks), compared
  value by value with the recorded ones, and each later block only when it receives the tensor the block
  before it returned, with its other tensor arguments equal to the recorded ones;
- every replayed block's parameters and buffers must equal the recorded ones (a fold that rewrote a weight,
  a swapped module: no replay), and none of its sub-modules may carry a hook (it would not run).
"""
from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..core.errors import DebiasError
from ..core.sites import Site
from ..edits.base import current_patch
from ..runtime import EDIT_ATTR


def _call(args: tuple, kwargs: dict, skip_first: bool) -> tuple[list[torch.Tensor], tuple]:
    """A block call's tensor arguments in a fixed order (the hidden state left out when ``skip_first``) and a
    description of the others (flags such as ``output_attentions`` change what a block returns)."""
    items = [(i, x) for i, x in enumerate(args)] + [(k, kwargs[k]) for k in sorted(kwargs)]
    tensors = [x for _, x in items if isinstance(x, torch.Tensor)]
    others = tuple((k, repr(x)) for k, x in items if not isinstance(x, torch.Tensor))
    return (tensors[1:] if skip_first else tensors), others


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def _map_tensors(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``output`` with ``fn`` applied to every tensor in it (nested tuples / lists keep their type; the rest as is)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)):
        return type(output)(_map_tensors(x, fn) for x in output)
    return output


def _detach(output: Any) -> Any:
    return _map_tensors(output, torch.Tensor.detach)


def _clone(output: Any) -> Any:
    """A copy the edit's hook and the rest of the tower may write into without touching the record."""
    return _map_tensors(output, torch.Tensor.clone)


def _same(a: tuple[list[torch.Tensor], tuple], b: tuple[list[torch.Tensor], tuple]) -> bool:
    """Two block calls' ``_call`` descriptions are equal, tensor values included."""
    (ta, oa), (tb, ob) = a, b
    return oa == ob and len(ta) == len(tb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))


def _detached_call(call: tuple[list[torch.Tensor], tuple]) -> tuple[list[torch.Tensor], tuple]:
    return [t.detach() for t in call[0]], call[1]


def _weights(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The block's own parameters and buffers: an installed edit's module (its SAE) is not the block's."""
    return [(name, t) for name, t in [*block.named_parameters(), *block.named_buffers()]
            if not name.startswith(EDIT_ATTR + ".")]


def _state(block: nn.Module) -> list[tuple]:
    """Cheap identity of a block's weights: in-place writes bump ``_version``, swaps change the storage."""
    return [(name, t.data_ptr(), t._version, tuple(t.shape)) for name, t in _weights(block)]


def _digest(block: nn.Module) -> str:
    """Exact identity of a block's weights (only computed when the cheap one changed)."""
    h = hashlib.sha256()
    for name, t in _weights(block):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Batch:
    first_call: tuple        # what the first block received (``_call``: every tensor, the other arguments)
    later_calls: list = field(default_factory=list)  # per later block, the same without the hidden state
    outputs: list = field(default_factory=list)      # per block, what its forward returned
    size: int = 0                                    # bytes held


class PrefixTrace:
    """Per batch, what each block of one unmodified tower run returned (see the module docstring)."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0    # batches whose replay reached the edit
        self.misses = 0  # batches computed in full (not recorded, or not exact)
        self._batches: dict[tuple, list[_Batch]] = {}     # (tower, shape of the first input) -> batches
        self._digests: dict[tuple[str, int], str] = {}    # (tower, block) -> weights digest when recorded
        self._states: dict[tuple[str, int], list] = {}    # (tower, block) -> cheap identity known to match
        self._changed: dict[tuple[str, int], list] = {}   # (tower, block) -> cheap identity known to differ

    @contextmanager
    def recording(self, adapter: Any, tower: str) -> Iterator["PrefixTrace"]:
        """Record every batch the unmodified ``tower`` runs inside the block (the model must carry no edit)."""
        if current_patch(adapter.model) is not None:
            raise DebiasError("a prefix trace records the unmodified model; remove its edits first")
        blocks = adapter.blocks(tower)
        for j, block in enumerate(blocks):
            digest = _digest(block)
            if self._digests.setdefault((tower, j), digest) != digest:  # other weights than last time: start over
                self._batches = {k: v for k, v in self._batches.items() if k[0] != tower}
                self.bytes = sum(b.size for v in self._batches.values() for b in v)
                self._digests[(tower, j)] = digest
            self._states[(tower, j)] = _state(block)
        current: list[_Batch | None] = [None]

        def make(j: int, block: nn.Module):
            original = block.forward

            def forward(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                batch = current[0]
                if j == 0:
                    if batch is not None:  # the last batch stopped before the last block (a tower that reads
                        self._keep(tower, batch)  # a middle layer): what it ran is kept
                    batch = current[0] = _Batch(_detached_call(_call(args, kwargs, False)))
                elif batch is None or len(batch.outputs) != j:
                    current[0] = None  # blocks out of order: this batch is not recorded
                    return out
                else:
                    batch.later_calls.append(_detached_call(_call(args, kwargs, True)))
                batch.outputs.append(_detach(out))
                if j == len(blocks) - 1:
                    self._keep(tower, batch)
                    current[0] = None
                return out
            return original, forward

        with _patched_forwards(blocks, range(len(blocks)), make):
            yield self
        if current[0] is not None:
            self._keep(tower, current[0])

    def _keep(self, tower: str, batch: _Batch) -> None:
        size = sum(t.numel() * t.element_size() for o in batch.outputs for t in _flat(o))
        size += sum(t.numel() * t.element_size() for t in batch.first_call[0])
        if not batch.first_call[0] or self.bytes + size > self.max_bytes:
            return  # over the budget: later batches are simply computed
        self.bytes += size
        batch.size = size
        self._batches.setdefault((tower, tuple(batch.first_call[0][0].shape)), []).append(batch)

    @contextmanager
    def replaying(self, adapter: Any, site: "str | Site") -> Iterator["PrefixTrace"]:
        """Inside the block, runs of ``site``'s tower replay the blocks an edit at ``site`` cannot change:
        up to the site's block for a ``resid_post`` site (its output is what the edit reads), the blocks
        before it for a site inside a block."""
        site = adapter.resolve_site(site)
        cut = site.layer if site.kind == "resid_post" else site.layer - 1
        blocks = adapter.blocks(site.tower)
        if cut < 0 or not any(k[0] == site.tower for k in self._batches):
            yield self
            return
        tower, current = site.tower, [None]

        def make(j: int, block: nn.Module):
            original = block.forward

            def forward(*args: Any, **kwargs: Any) -> Any:
                if j == 0:
                    current[0] = self._find(tower, blocks, cut, _call(args, kwargs, False))
                    if current[0] is None:
                        self.misses += 1
                batch = current[0]
                if batch is not None and j > 0:
                    hidden = args[0] if args else kwargs.get("hidden_states")
                    if hidden is not _first(batch.outputs[j - 1]) or not _same(_call(args, kwargs, True), batch.later_calls[j - 1]):
                        batch = current[0] = None
                        self.misses += 1
                if batch is None:
                    return original(*args, **kwargs)
                if j == cut:
                    current[0] = None
                    self.hits += 1
                    return _clone(batch.outputs[j])
                return batch.outputs[j]
            return original, forward

        with _patched_forwards(blocks, range(cut + 1), make):
            yield self

    def _find(self, tower: str, blocks: nn.ModuleList, cut: int, call: tuple) -> _Batch | None:
        if not call[0]:
            return None
        candidates = self._batches.get((tower, tuple(call[0][0].shape)), [])
        batch = next((b for b in candidates if len(b.outputs) > cut and _same(call, b.first_call)), None)
        if batch is None or not self._unchanged(tower, blocks, cut):
            return None
        return batch

    def _unchanged(self, tower: str, blocks: nn.ModuleList, cut: int) -> bool:
        """Blocks 0..cut hold the recorded weights, and no hook could skip a replay or write into a record: none
        on their sub-modules, none on blocks before ``cut``; block ``cut`` may carry forward hooks (the edit),
        which get a copy."""
        for j in range(cut + 1):
            block = blocks[j]
            if block._forward_pre_hooks or (j < cut and block._forward_hooks):
                return False
            for sub in block.modules():
                if sub is not block and (sub._forward_hooks or sub._forward_pre_hooks):
                    return False
            state = _state(block)
            if state != self._states.get((tower, j)):
                if state == self._changed.get((tower, j)):
                    return False  # the same rewritten weights as last batch: no need to hash them again
                if _digest(block) != self._digests.get((tower, j)):
                    self._changed[(tower, j)] = state
                    return False
                self._states[(tower, j)] = state  # rewritten with the same values (e.g. a fold undone)
        return True


def _flat(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for x in output for t in _flat(x)]
    return []


@contextmanager
def _patched_forwards(blocks: nn.ModuleList, which: range, make) -> Iterator[None]:
    """Give blocks ``which`` an instance ``forward`` (``make(j, block) -> (original, new)``), restored on exit.
    Hooks on the blocks themselves stay and run around the new forward."""
    with ExitStack() as stack:
        for j in which:
            block = blocks[j]
            had_own = "forward" in block.__dict__
            original, new = make(j, block)
            block.forward = new

            def restore(block: nn.Module = block, had_own: bool = had_own, original: Any = original) -> None:
                if had_own:
                    block.forward = original
                else:
                    del block.forward
            stack.callback(restore)
        yield
