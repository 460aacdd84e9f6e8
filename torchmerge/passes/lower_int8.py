"""LowerInt8: run the nodes a PrecisionPlan marks int8 in integer-only arithmetic (I-ViT, arXiv 2207.01405).

Needs activation ranges from :class:`torchmerge.passes.calibrate.Calibrate` (node.meta["tm_amax"]).
Rewrites, per ATen node planned int8 (numerics: design doc "Numerics decisions already taken"):
  linear (mm/addmm, constant W) → int8_linear: W int8 per output channel (packed here, once), x int8 per
      tensor, int32 accumulation and bias, dyadic requantisation to int8 (when every consumer is an int8
      product) or int16;
  matmul (bmm/mm of activations) → int8 × int8 products accumulated exactly in int32 by torchmerge::int8_bmm
      (K ≤ 131071; beyond, in fp64, exact below 2^53); int32 result;
  softmax (last dim)  → shiftmax on int16 logits → int8 probabilities (scale 2^-7);
  gelu                → I-BERT i_gelu (default) or I-ViT shift_gelu (x·σ(1.702x)) on int16 → int32;
  layernorm           → i_layernorm on int8/int16 → int16 (feeds a residual add) or int8.
Linear inputs are smoothed (SmoothQuant, x_c / s_c with s_c = amax_x,c^α / amax_W,c^(1-α), W[:, c]·s_c) inside
the per-channel requantisation that produces them, so outlier channels do not eat the per-tensor int8 range.
Measured on all-MiniLM-L6-v2 (34 sentences, calibrated on them): min cosine to fp32 0.946 without smoothing
(α=0.5 too), 0.992 at α=0.75, 0.9954 at α=0.8 with i_gelu (0.9915 with shift_gelu).
Held-out calibration (ranges from 32 other, varied sentences; the evaluated ones reach up to 1.4× a calibrated
range, mostly attention logits and Q/K/V): scales cover a margin over the calibrated range, int16 ×2 (1 of 15
bits) and int8 ×1.25. Min cosine, calibrated on other sentences / on the same ones: 0.992-0.993 / 0.994 with
the margins; 0.992-0.995 / 0.995 without (int8 resolution dominates, the figures move by ±0.002 with the
sentences). Calibrating on 32 short templated sentences instead: 0.978 without margins, 0.983 with ×1.25,
0.987 with int8 ×1.5 (which costs ≈0.001-0.003 on varied calibration), so the default is ×1.25.
Between them values stay integer: views/permutes/clones act on the integer tensor, multiplication by a positive
constant only changes the scale, an additive attention mask becomes where(mask == 0, x, qmin), and a residual
add whose result feeds an integer op is requantised into the int16 residual stream (I-ViT; one add_requantized
when both terms are integer). Float consumers
read a dequantised copy (int · scale); integers change type only through requantize (dyadic, never float).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.constants import add_constant
from ..graph.pass_base import GraphPass, NodeError, PassResult
from ..precision.plan import PrecisionPlan
from ._match import is_op, linear_parts, scalar_value

aten = torch.ops.aten
QMAX = {torch.int8: 127, torch.int16: 32767, torch.int32: 2**31 - 1}
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
         aten.transpose.int, aten.t.default, aten.expand.default, aten.clone.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.alias.default)


@dataclass(frozen=True)
class QVal:
    """An integer graph value standing for a float one: real ≈ node · scale; amax is the real value's range."""

    node: fx.Node
    scale: float
    dtype: torch.dtype
    amax: float


def _amax(node: fx.Node) -> float:
    if "tm_amax" not in node.meta:
        raise NodeError(node, "int8 needs activation ranges: run the Calibrate pass with example batches first "
                              "(torchmerge.compile(..., calibration=[(tensors, ...)]), torch.compile options "
                              "calibration=CalibrationData([...]), or the call's example inputs)")
    return max(float(node.meta["tm_amax"]), 1e-8)


@dataclass(frozen=True)
class LowerInt8(GraphPass):
    """Integer-only lowering of plan entries of kind int8 (see the module docstring)."""

    plan: PrecisionPlan
    gelu: str = "poly"  # "poly" (I-BERT i-GELU, erf-accurate) or "shift" (I-ViT ShiftGELU, x·σ(1.702x))
    softmax_bits: int = 8
    sigmoid_bits: int = 15
    smooth_alpha: float | None = 0.8  # SmoothQuant migration strength for linear inputs; None: plain per-tensor
    # headroom over the calibrated ranges for inputs the calibration batches did not cover: a scale covers
    # margin × the range. int16 (residual stream, layernorm/linear outputs, softmax logits) spends 1 of 15 bits;
    # int8 (linear/matmul inputs) trades 0.3 bit of resolution for less clipping (see the module docstring)
    int8_margin: float = 1.25
    int16_margin: float = 2.0
    name = "lower_int8"

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.int8_margin < 1.0 or self.int16_margin < 1.0:
            raise ValueError(f"lower_int8: margins must be ≥ 1; got int8_margin={self.int8_margin}, "
                             f"int16_margin={self.int16_margin}")
        if self.gelu not in ("shift", "poly"):
            raise ValueError(f"lower_int8: gelu must be 'shift' or 'poly'; got {self.gelu!r}")
        from .. import ops  # noqa: F401  (registers torch.ops.torchmerge.*)

        planned = set(self.plan.targets(gm, "int8"))
        lowered = {n for n in planned if _lowerable(n)}
        if lowered and not any("tm_amax" in n.meta for n in gm.graph.nodes):
            _amax(next(n for n in gm.graph.nodes if n in lowered))  # one named error, at the first int8 node
        return _Lowering(gm, self, lowered).run()


def _lowerable(node: fx.Node) -> bool:
    if is_op(node, aten.mm.default, aten.addmm.default):
        return linear_parts(node) is not None or is_op(node, aten.mm.default)
    if is_op(node, aten.bmm.default):
        return True
    if is_op(node, aten._softmax.default):
        return node.args[1] in (-1, node.meta["val"].dim() - 1)
    if is_op(node, aten.gelu.default):
        return True
    if is_op(node, aten.native_layer_norm.default):
        return len(node.args[1]) == 1 and all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)
    return False


def _scalar_arg(node: fx.Node):
    """The positive constant c of mul(x, c) / div(x, c), else None."""
    if not is_op(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        return None
    c = scalar_value(node.args[1]) if not isinstance(node.args[1], fx.Node) or node.args[1].op == "get_attr" else None
    if not isinstance(c, (int, float)) or c <= 0:
        return None
    return float(c) if is_op(node, aten.mul.Tensor, aten.mul.Scalar) else 1.0 / float(c)


class _Lowering:
    def __init__(self, gm: fx.GraphModule, opts: LowerInt8, lowered: set):
        self.gm, self.g, self.opts, self.lowered = gm, gm.graph, opts, lowered
        self.q: dict[fx.Node, QVal] = {}
        self.cache: dict = {}
        self.masked: dict[fx.Node, fx.Node] = {}  # float `x + mask` add -> its additive attention mask

    # -- helpers that emit graph nodes before self.at -------------------------------------------------
    def op(self, target, *args, **kwargs) -> fx.Node:
        with self.g.inserting_before(self.at):
            return self.g.call_function(target, args, kwargs)

    def const(self, t: torch.Tensor, hint: str) -> fx.Node:
        return add_constant(self.gm, t, f"{self.at.name}_{hint}", before=self.at)

    def dyadic(self, real) -> tuple[fx.Node, fx.Node]:
        from ..ops.quant import dyadic_multiplier

        m, s = dyadic_multiplier(real)
        return self.const(m, "m"), self.const(s, "s")

    def scale_for(self, amax: float, dtype: torch.dtype) -> float:
        """Per-tensor scale of a `dtype` activation whose calibrated range is `amax` (widened by the margin)."""
        margin = {torch.int8: self.opts.int8_margin, torch.int16: self.opts.int16_margin}.get(dtype, 1.0)
        return amax * margin / QMAX[dtype]

    def to_scale(self, v: QVal, scale: float, dtype: torch.dtype) -> fx.Node:
        """Integer node with real ≈ node · scale, by dyadic requantisation (no float on the way)."""
        key = (v.node, scale, dtype)
        if key not in self.cache:
            if v.scale == scale and v.dtype == dtype:
                return v.node
            m, s = self.dyadic(v.scale / scale)  # requantize reads int8/int16/int32 directly
            self.cache[key] = self.op(torch.ops.torchmerge.requantize.default, v.node, m, s, dtype)
        return self.cache[key]

    def as_int(self, node: fx.Node, dtype: torch.dtype, min_scale: float = 0.0) -> QVal:
        """`node`'s value as `dtype` with a per-tensor scale from its range (quantised once if it is float)."""
        v = self.q.get(node)
        if v is not None and v.dtype == dtype and v.scale >= min_scale:
            return v
        amax = v.amax if v is not None else _amax(node)
        scale = max(self.scale_for(amax, dtype), min_scale)
        if v is not None:
            return QVal(self.to_scale(v, scale, dtype), scale, dtype, amax)
        return QVal(self.quantize(node, scale, dtype), scale, dtype, amax)

    def as_int_smoothed(self, node: fx.Node, smooth: torch.Tensor, amax_ch: torch.Tensor) -> QVal:
        """int8 of x[..., c] / smooth[c] (SmoothQuant, arXiv 2211.10438): per-channel requantisation (or
        quantisation) into one per-tensor scale; the linear's weight columns are multiplied by smooth."""
        amax = float((amax_ch / smooth).max().clamp(min=1e-8))
        scale = self.scale_for(amax, torch.int8)
        v = self.q.get(node)
        if v is None:
            factor = self.const((1.0 / (smooth.double() * scale)).float(), "smooth")
            scaled = self.op(aten.round.default, self.op(aten.mul.Tensor, node, factor))
            out = self.op(aten._to_copy.default, self.op(aten.clamp.default, scaled, -128, 127), dtype=torch.int8)
        else:
            m, s = self.dyadic(v.scale / (smooth.double() * scale))
            out = self.op(torch.ops.torchmerge.requantize.default, v.node, m, s, torch.int8)
        return QVal(out, scale, torch.int8, amax)

    def quantize(self, node: fx.Node, scale: float, dtype: torch.dtype) -> fx.Node:
        """Float → integer at the boundary of an integer region: clamp(round(x / scale)) as `dtype`."""
        key = (node, scale, dtype)
        if key not in self.cache:
            scaled = self.op(aten.mul.Tensor, node, 1.0 / scale)
            clamped = self.op(aten.clamp.default, self.op(aten.round.default, scaled), -QMAX[dtype] - 1, QMAX[dtype])
            self.cache[key] = self.op(aten._to_copy.default, clamped, dtype=dtype)
        return self.cache[key]

    def finish(self, node: fx.Node, value: QVal) -> None:
        """Replace the float `node` by a dequantised copy of `value`; integer consumers read `value`."""
        as_float = self.op(aten._to_copy.default, value.node, dtype=torch.float32)
        deq = self.op(aten.mul.Tensor, as_float, value.scale)
        for n in (as_float, deq, value.node):
            n.meta.setdefault("nn_module_stack", node.meta.get("nn_module_stack"))
        node.replace_all_uses_with(deq)
        self.g.erase_node(node)
        self.q[deq] = value

    # -- consumers ------------------------------------------------------------------------------------
    def users_through_views(self, node: fx.Node):
        for u in node.users:
            if is_op(u, *VIEWS) or _scalar_arg(u) is not None:
                yield from self.users_through_views(u)
            else:
                yield u

    def wants_int(self, node: fx.Node) -> bool:
        """Some consumer (through views) is an integer op, or an add that feeds one."""
        return any(u in self.lowered or (is_op(u, aten.add.Tensor) and self.wants_int(u))
                   for u in self.users_through_views(node))

    def out_dtype(self, node: fx.Node) -> torch.dtype:
        """int8 when every consumer is an int8 product (linear/matmul), else the int16 residual stream."""
        users = list(self.users_through_views(node))
        int8_only = users and all(u in self.lowered and is_op(u, aten.mm.default, aten.addmm.default,
                                                               aten.bmm.default) for u in users)
        return torch.int8 if int8_only else torch.int16

    # -- rewrites -------------------------------------------------------------------------------------
    def run(self) -> PassResult:
        changed = False
        for node in list(self.g.nodes):
            if node._erased:
                continue
            self.at = node
            if node in self.lowered:
                self.lower(node)
                changed = True
            elif is_op(node, *VIEWS) and node.args[0] in self.q:
                v = self.q[node.args[0]]
                self.q[node] = QVal(self.op(node.target, v.node, *node.args[1:], **node.kwargs), v.scale, v.dtype, v.amax)
            elif _scalar_arg(node) is not None and node.args[0] in self.q:
                v, c = self.q[node.args[0]], _scalar_arg(node)
                self.q[node] = QVal(v.node, v.scale * c, v.dtype, v.amax * c)
            elif is_op(node, aten.add.Tensor) and any(a in self.q for a in node.args[:2]) and self.wants_int(node):
                self.lower_add(node)
                changed = True
            elif is_op(node, aten.eq.Scalar) and node.args[0] in self.masked and node.args[1] == float("-inf"):
                self.lower_masked_eq(node)
                changed = True
            elif is_op(node, aten.where.self) and self.lower_zero_where(node):
                changed = True
        if changed:
            self.g.lint()
            self.gm.recompile()
        return PassResult(self.gm, changed)

    def lower(self, node: fx.Node) -> None:
        tm = torch.ops.torchmerge
        if is_op(node, aten._softmax.default):
            x = self.as_int(node.args[0], torch.int16)
            bits = self.opts.softmax_bits
            out = self.op(tm.shiftmax.default, x.node, x.scale, bits, "shift")
            return self.finish(node, QVal(out, 2.0 ** -(bits - 1), torch.int8 if bits <= 8 else torch.int16, 1.0))
        if is_op(node, aten.gelu.default):
            return self.lower_gelu(node)
        if is_op(node, aten.native_layer_norm.default):
            return self.lower_layernorm(node)
        parts = linear_parts(node)
        if parts is not None:
            return self.lower_linear(node, *parts)
        from ..ops.intlinear import MAX_K_BMM

        a, b = (self.as_int(x, torch.int8) for x in node.args[:2])
        k = int(node.args[0].meta["val"].shape[-1])
        if k <= MAX_K_BMM:  # exact int32 accumulation in one native op (VNNI)
            out = self.op(torch.ops.torchmerge.int8_bmm.default, a.node, b.node)
        else:  # exact in float64 (every partial sum is an integer below 2^53), then int32
            fa, fb = (self.op(aten._to_copy.default, v.node, dtype=torch.float64) for v in (a, b))
            out = self.op(aten._to_copy.default, self.op(node.target, fa, fb), dtype=torch.int32)
        self.finish(node, QVal(out, a.scale * b.scale, torch.int32, _amax(node)))

    def lower_linear(self, node: fx.Node, x: fx.Node, wt: torch.Tensor, bias) -> None:
        from ..ops.intlinear import int8_linear_params
        from ..ops.quant import quantize_weight_per_channel

        w = wt.t().contiguous().float()
        x_ch = x.meta.get("tm_amax_ch") if self.opts.smooth_alpha is not None else None
        if isinstance(x_ch, torch.Tensor) and x_ch.shape == (w.shape[1],):
            alpha = self.opts.smooth_alpha
            smooth = x_ch.clamp(min=1e-6) ** alpha / w.abs().amax(0).clamp(min=1e-6) ** (1 - alpha)
            xq, w = self.as_int_smoothed(x, smooth, x_ch), w * smooth
        else:
            xq = self.as_int(x, torch.int8)
        w_int, w_scale = quantize_weight_per_channel(w)
        dtype = self.out_dtype(node)
        out_scale = self.scale_for(_amax(node), dtype)
        b, m, s = int8_linear_params(xq.scale, w_scale, out_scale, None if bias is None else bias.reshape(-1))
        args = [self.const(w_int, "w8"), None if b is None else self.const(b, "b32"), self.const(m, "m"), self.const(s, "s")]
        out = self.op(torch.ops.torchmerge.int8_linear.default, xq.node, *args, dtype)
        self.finish(node, QVal(out, out_scale, dtype, _amax(node)))

    def lower_gelu(self, node: fx.Node) -> None:
        from ..ops.intnonlinear import _i_gelu_consts

        tm = torch.ops.torchmerge
        if self.opts.gelu == "shift":
            x = self.as_int(node.args[0], torch.int16, min_scale=2.0**-13)
            bits = self.opts.sigmoid_bits
            out = self.op(tm.shift_gelu.default, x.node, x.scale, bits, False)
            scale = x.scale / 2 ** (bits - 1)
        else:
            # x·(erf + one) < 2^31 needs |x|/s · 2·one < 2^31 with one ≈ 4.2e-4 / s²: s ≥ 7.3e-5 · amax^(1/3)
            amax = self.q[node.args[0]].amax if node.args[0] in self.q else _amax(node.args[0])
            x = self.as_int(node.args[0], torch.int16, min_scale=1e-4 * amax ** (1 / 3))
            out = self.op(tm.i_gelu.default, x.node, x.scale)
            scale = _i_gelu_consts(x.scale)[3]
        self.finish(node, QVal(out, scale, torch.int32, _amax(node)))

    def lower_layernorm(self, node: fx.Node) -> None:
        from ..graph.constants import get_constant
        from ..ops.intnonlinear import i_layernorm_params

        x, shape, weight, bias = node.args[:4]
        dim = int(shape[0])
        w = get_constant(weight) if isinstance(weight, fx.Node) else torch.ones(dim)
        b = get_constant(bias) if isinstance(bias, fx.Node) else torch.zeros(dim)
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise NodeError(node, "int8 layernorm needs constant weight and bias")
        v = self.q.get(x)
        xi = self.as_int(x, v.dtype if v is not None and v.dtype != torch.int32 else torch.int16)
        (out_node,) = node.users
        dtype = self.out_dtype(out_node)
        out_scale = self.scale_for(_amax(out_node), dtype)
        m, s, bq = i_layernorm_params(w, b, out_scale)
        out = self.op(torch.ops.torchmerge.i_layernorm.default, xi.node, self.const(m, "m"), self.const(s, "s"),
                      self.const(bq, "b"), dtype)
        self.at = out_node
        self.finish(out_node, QVal(out, out_scale, dtype, _amax(out_node)))
        self.g.erase_node(node)

    def lower_masked_eq(self, node: fx.Node) -> None:
        """SDPA's fully-masked-row guard tests (x + mask) == -inf. x is a dequantised integer, finite and
        far below 2^103, so the sum is -inf exactly where the mask is: test the (small, broadcast) mask
        instead, and the float scores are no longer needed."""
        mask = self.masked[node.args[0]]
        # not expanded to the scores' shape: the row reductions that follow then run over the (heads-times
        # smaller) mask and broadcast like the float graph did; the graph is re-traced by the inner compiler
        new = self.op(aten.eq.Scalar, mask, float("-inf"))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        if "val" in mask.meta:
            new.meta["val"] = mask.meta["val"] == float("-inf")
        node.replace_all_uses_with(new)
        self.g.erase_node(node)

    def lower_zero_where(self, node: fx.Node) -> bool:
        """where(cond, 0, x) or where(cond, x, 0) with x integer-backed (SDPA zeroes the probabilities of
        fully masked rows this way) becomes x · keep in x's integer dtype and scale: exact, and inductor
        vectorises it at full width (a where on int8 with a bool row condition became a 16-lane masked
        blend). Returns whether it rewrote `node`."""
        cond, a, b = node.args[:3]

        def is_zero(n) -> bool:
            if isinstance(n, (int, float)):
                return n == 0
            return isinstance(n, fx.Node) and (
                (is_op(n, aten.full_like.default) and n.args[1] == 0)
                or is_op(n, aten.zeros_like.default)
                or (is_op(n, aten.scalar_tensor.default) and n.args[0] == 0))

        if not isinstance(cond, fx.Node) or node.kwargs:
            return False
        for zero, x in ((a, b), (b, a)):
            if x in self.q and is_zero(zero):
                v = self.q[x]
                keep = cond if zero is b else self.op(aten.logical_not.default, cond)  # 1 where x is kept
                factor = self.op(aten._to_copy.default, keep, dtype=v.dtype)
                self.finish(node, QVal(self.op(aten.mul.Tensor, v.node, factor), v.scale, v.dtype, v.amax))
                return True
        return False

    def lower_add(self, node: fx.Node) -> None:
        a, b = node.args[:2]
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or node.kwargs:
            return
        if a not in self.q:
            a, b = b, a
        if b not in self.q and b.meta.get("tm_mask"):  # additive attention mask: 0 keeps, -inf drops
            x = self.as_int(a, torch.int16)
            keep = self.op(aten.eq.Scalar, b, 0)
            out = self.op(aten.where.ScalarOther, keep, x.node, -QMAX[torch.int16] - 1)
            self.q[node] = QVal(out, x.scale, torch.int16, x.amax)
            self.masked[node] = b
            return
        amax = _amax(node)
        scale = self.scale_for(amax, torch.int16)
        if a in self.q and b in self.q:  # both integer: one fused pass (add_requantized)
            (ma, sa), (mb, sb) = self.dyadic(self.q[a].scale / scale), self.dyadic(self.q[b].scale / scale)
            out = self.op(torch.ops.torchmerge.add_requantized.default, self.q[a].node, ma, sa, self.q[b].node, mb, sb,
                          torch.int16)
            return self.finish(node, QVal(out, scale, torch.int16, amax))
        parts = [self.to_scale(self.q[v], scale, torch.int16) if v in self.q else self.quantize(v, scale, torch.int16)
                 for v in (a, b)]
        wide = [self.op(aten._to_copy.default, p, dtype=torch.int32) for p in parts]
        total = self.op(aten.clamp.default, self.op(aten.add.Tensor, *wide), -32768, 32767)
        self.finish(node, QVal(self.op(aten._to_copy.default, total, dtype=torch.int16), scale, torch.int16, amax))
