"""Calibrate: run the float graph on example batches and record each node's activation range as node meta.

Integer-only lowering (I-ViT, arXiv 2207.01405) needs a per-tensor scale for every activation it keeps in
integers. This pass executes the graph as it stands (before any lowering) with torch.fx.Interpreter on each
batch and stores, for every node that yields a floating tensor,
  node.meta["tm_amax"] = max over batches of max |x|        (symmetric per-tensor range, MinMax observer)
  node.meta["tm_mask"] = True when every value seen is 0 or ≤ -1e30 (an additive attention mask)
  node.meta["tm_amax_ch"] = max |x| per last-dim channel (for SmoothQuant-style smoothing), or None
Lowerings read these fields; the graph itself is not changed. `batches` are tuples of graph inputs in
placeholder order; :func:`graph_args` builds them from a model's tensor inputs (SymInt placeholders of a
dynamic graph are filled from the matching tensor dimensions). :class:`CalibrationData` carries batches through
torch.compile's options dict (it compares by identity, so dynamo never compares tensors).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from ..graph.pass_base import GraphPass, PassResult

MASK_VALUE = -1e30  # anything at or below this is an additive mask entry, not an activation


def graph_args(gm: fx.GraphModule, tensors: Sequence[torch.Tensor]) -> tuple:
    """Arguments for `gm`'s placeholders: tensor placeholders take `tensors` in order; a SymInt placeholder
    takes the size of the first tensor dimension whose symbolic size is that symbol."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    vals = [p.meta.get("val") for p in placeholders]
    tensor_slots = [i for i, v in enumerate(vals) if not isinstance(v, (int, torch.SymInt))]
    if len(tensor_slots) != len(tensors):
        raise ValueError(f"calibration batch has {len(tensors)} tensors; the graph takes {len(tensor_slots)} "
                         f"({', '.join(placeholders[i].name for i in tensor_slots)})")
    args: list = [None] * len(placeholders)
    for slot, t in zip(tensor_slots, tensors):
        args[slot] = t
    for i, v in enumerate(vals):
        if i in tensor_slots:
            continue
        if isinstance(v, int):
            args[i] = v
            continue
        found = next((args[j].shape[d] for j in tensor_slots if isinstance(vals[j], torch.Tensor)
                      for d, size in enumerate(vals[j].shape) if str(size) == str(v)), None)
        if found is None:
            raise ValueError(f"calibration: cannot infer the value of symbolic input '{placeholders[i].name}' ({v})")
        args[i] = int(found)
    return tuple(args)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, stats: dict):
        super().__init__(gm)
        self.stats = stats

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            finite = out.detach().float()
            mask_like = bool(((finite == 0) | (finite <= MASK_VALUE)).all())
            amax = float(finite.abs().max()) if not mask_like else 0.0
            per_channel = finite.abs().reshape(-1, out.shape[-1]).amax(0) if out.dim() and not mask_like else None
            old = self.stats.get(n.name, (0.0, True, None))
            if old[2] is not None and per_channel is not None and old[2].shape == per_channel.shape:
                per_channel = torch.maximum(old[2], per_channel)
            self.stats[n.name] = (max(old[0], amax), old[1] and mask_like, per_channel)
        return out


class CalibrationData:
    """Calibration batches to hand through `torch.compile(..., options={"calibration": CalibrationData(...)})`.

    torch.compile keeps its options dict and compares it with ``==`` against the options of other live
    compiles; a list of tensors cannot be compared that way (``bool(tensor == tensor)`` raises). This wrapper
    compares and hashes by identity, so two compiles are "the same options" only when they share the object.
    `batches`: an iterable of batches, each a tuple (or list) of the model's tensor inputs, or one tensor for a
    one-input model. Iterating yields the batches as tuples.
    """

    __slots__ = ("batches", "_digest")

    def __init__(self, batches):
        if isinstance(batches, CalibrationData):  # re-wrapping shares the batches (and the digest)
            self.batches, self._digest = batches.batches, batches._digest
            return
        if isinstance(batches, torch.Tensor):
            raise TypeError("CalibrationData takes a list of batches (tuples of input tensors), not one tensor; "
                            "wrap it: CalibrationData([(x,)])")
        self.batches = tuple(tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in batches)
        if not self.batches:
            raise ValueError("CalibrationData: no batches; pass at least one tuple of input tensors")
        self._digest = None

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]

    def __eq__(self, other) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def digest(self) -> str:
        if self._digest is None:
            self._digest = batches_digest(self.batches)
        return self._digest

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in b))
                           for b in self.batches[:3])
        more = f", … {len(self.batches) - 3} more" if len(self.batches) > 3 else ""
        return f"CalibrationData([{shapes}{more}])"


def batches_digest(batches) -> str:
    """A content hash of calibration batches (for compile-cache keys)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    h = hashlib.sha256()
    with unset_fake_temporarily():  # called for cache keys while the compiler's fake mode is active
        _digest_into(h, batches)
    return h.hexdigest()


def _digest_into(h, batches) -> None:
    for batch in batches:
        for t in batch:
            if isinstance(t, torch.Tensor):
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
            else:
                h.update(repr(t).encode())


@dataclass(frozen=True, eq=False)
class Calibrate(GraphPass):
    """Record activation ranges (meta tm_amax / tm_mask) from `batches` of graph inputs; never edits the graph."""

    batches: tuple
    name = "calibrate"

    def options(self) -> dict:
        return {"batches": batches_digest(self.batches)}

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.batches:
            raise ValueError("calibrate: no calibration batches; pass at least one tuple of graph inputs")
        stats: dict = {}
        recorder = _Recorder(gm, stats)
        with torch.no_grad():
            for batch in self.batches:
                recorder.run(*batch)
        for node in gm.graph.nodes:
            if node.name in stats:
                node.meta["tm_amax"], node.meta["tm_mask"], node.meta["tm_amax_ch"] = stats[node.name]
        return PassResult(gm, False)
