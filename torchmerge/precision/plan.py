"""PrecisionPlan / LayerPrecision: which arithmetic each node or module of a captured graph runs in.

A plan is an immutable map key → LayerPrecision. A key is
  * a node name of the ATen graph ("addmm_3"),
  * a module path ("encoder.layer.0.attention"), covering every node traced inside that module, or
  * "*" (every node) / "@<kind>" (every node of one op kind, e.g. "@matmul" for attention products).
For a node the most specific key wins (node name > deepest module path > "@kind" > "*"); module and
wildcard keys only apply where the op supports the precision, explicit node keys must support it.
Precisions: fp32 | bf16 | int8 | lmul(m,l) (L-Mul, mantissa bits m, offset exponent l) |
lut(bits,group) (T-MAC table lookup over `bits`-bit weights quantised in groups of `group`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

import torch
import torch.fx as fx

aten = torch.ops.aten
KINDS = ("linear", "matmul", "conv", "softmax", "gelu", "layernorm")
SUPPORTED: Mapping[str, frozenset] = MappingProxyType({
    "fp32": frozenset(KINDS), "bf16": frozenset(KINDS),
    "int8": frozenset({"linear", "matmul", "softmax", "gelu", "layernorm"}),
    "lmul": frozenset({"linear", "matmul"}), "lut": frozenset({"linear"}),
})


class PlanError(ValueError):
    """A precision string or plan entry is invalid; the message names it and lists valid choices."""


def default_offset_exp(m: int) -> int:
    """L-Mul offset exponent l(m) of Luo & Sun 2024 (arXiv 2410.00907): m if m ≤ 3, 3 if m = 4, else 4."""
    return m if m <= 3 else (3 if m == 4 else 4)


_SPEC = re.compile(r"^\s*(\w+)\s*(?:\((.*)\))?\s*$")


@dataclass(frozen=True)
class LayerPrecision:
    """One precision: kind plus its parameters (m, l for lmul; bits, group for lut)."""

    kind: str
    m: int | None = None
    l: int | None = None
    bits: int | None = None
    group: int | None = None

    def __post_init__(self):
        if self.kind not in SUPPORTED:
            raise PlanError(f"precision '{self.kind}' is unknown; valid: fp32, bf16, int8, lmul(m,l), lut(bits,group)")
        if self.kind == "lmul":
            if self.m is None or not 0 <= self.m <= 23:
                raise PlanError(f"lmul: mantissa bits m must be in 0..23, got {self.m}")
            if self.l is None:
                object.__setattr__(self, "l", default_offset_exp(self.m))
        if self.kind == "lut":
            if self.bits not in (1, 2, 3, 4):
                raise PlanError(f"lut: bits must be one of 1, 2, 3, 4, got {self.bits}")
            group = 32 if self.group is None else self.group
            if group < 4 or group % 4:
                raise PlanError(f"lut: group must be a positive multiple of 4, got {group}")
            object.__setattr__(self, "group", group)

    @classmethod
    def parse(cls, text: "str | LayerPrecision") -> "LayerPrecision":
        """Parse 'fp32', 'bf16', 'int8', 'lmul(4)', 'lmul(4,3)', 'lmul(m=4,l=3)', 'lut(4)', 'lut(bits=4,group=32)'."""
        if isinstance(text, LayerPrecision):
            return text
        match = _SPEC.match(str(text))
        if not match:
            raise PlanError(f"cannot parse precision {text!r}; valid: fp32, bf16, int8, lmul(m,l), lut(bits,group)")
        kind, inner = match.group(1).lower(), match.group(2)
        names = {"lmul": ("m", "l"), "lut": ("bits", "group")}.get(kind, ())
        values: dict = {}
        for i, part in enumerate(p.strip() for p in (inner or "").split(",") if p.strip()):
            key, _, val = part.rpartition("=")
            key = key.strip() or (names[i] if i < len(names) else "?")
            if key not in names or not val.strip().lstrip("-").isdigit():
                raise PlanError(f"bad parameter {part!r} in precision {text!r}; valid for {kind}: {', '.join(names) or 'none'}")
            values[key] = int(val)
        return cls(kind, **values)

    def __str__(self) -> str:
        if self.kind == "lmul":
            return f"lmul(m={self.m},l={self.l})"
        if self.kind == "lut":
            return f"lut(bits={self.bits},group={self.group})"
        return self.kind


def op_kind(node: fx.Node) -> str | None:
    """Classify an ATen node: linear (matmul with a constant weight), matmul (activation × activation), conv, ..."""
    if node.op != "call_function":
        return None
    packet = getattr(node.target, "overloadpacket", None)
    if packet in (aten.mm, aten.addmm, aten.linear):
        weight = node.args[1] if packet is aten.linear else node.args[-1] if packet is aten.addmm else node.args[1]
        while isinstance(weight, fx.Node) and weight.op == "call_function" and getattr(
                weight.target, "overloadpacket", None) in (aten.t, aten.permute, aten.transpose):
            weight = weight.args[0]
        return "linear" if isinstance(weight, fx.Node) and weight.op == "get_attr" else "matmul"
    return {aten.bmm: "matmul", aten.matmul: "matmul", aten.convolution: "conv", aten._softmax: "softmax",
            aten.softmax: "softmax", aten.gelu: "gelu", aten.native_layer_norm: "layernorm",
            aten.layer_norm: "layernorm"}.get(packet)


def module_paths(node: fx.Node) -> list[str]:
    """Module paths (outermost first) a node was traced in, normalised to 'a.b.0' form."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        path = re.sub(r"^L\[[^\]]*\]\.?", "", path)
        path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
        path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip(".")
        if path:
            out.append(path)
    return out


class PrecisionPlan:
    """Immutable map node-or-module-path → LayerPrecision; see the module docstring for key rules."""

    def __init__(self, entries: Mapping[str, "str | LayerPrecision"] | None = None):
        parsed = {}
        for key, value in (entries or {}).items():
            try:
                parsed[str(key)] = LayerPrecision.parse(value)
            except PlanError as exc:
                raise PlanError(f"plan key '{key}': {exc}") from None
        self._entries = MappingProxyType(parsed)

    @property
    def entries(self) -> Mapping[str, LayerPrecision]:
        return self._entries

    @classmethod
    def uniform(cls, gm: fx.GraphModule | None, precision: "str | LayerPrecision",
                kinds: Iterable[str] | None = None) -> "PrecisionPlan":
        """Every node of `gm` (optionally only of `kinds`) that supports `precision` runs in it."""
        prec = LayerPrecision.parse(precision)
        kinds = tuple(kinds) if kinds is not None else None
        bad = [k for k in (kinds or ()) if k not in SUPPORTED[prec.kind]]
        if bad:
            raise PlanError(f"op kind '{bad[0]}' cannot run in {prec}; valid kinds: {', '.join(sorted(SUPPORTED[prec.kind]))}")
        plan = cls({"*": prec} if kinds is None else {f"@{k}": prec for k in kinds})
        if gm is not None:
            plan.validate(gm)
        return plan


    def updated(self, entries: Mapping[str, "str | LayerPrecision"]) -> "PrecisionPlan":
        """A new plan with `entries` added or replaced."""
        return PrecisionPlan({**self._entries, **entries})

    def lookup(self, node: fx.Node) -> LayerPrecision | None:
        """The precision this plan assigns to `node`, or None when the plan leaves it alone."""
        kind = op_kind(node)
        if node.name in self._entries:
            return self._entries[node.name]
        if kind is None:
            return None
        candidates = [p for p in reversed(module_paths(node)) if p in self._entries]
        candidates += [k for k in (f"@{kind}", "*") if k in self._entries]
        for key in candidates:
            prec = self._entries[key]
            if kind in SUPPORTED[prec.kind]:
                return prec
        return None

    def resolve(self, gm: fx.GraphModule) -> dict[str, LayerPrecision]:
        """node name → precision for every node of `gm` the plan covers (after validation)."""
        self.validate(gm)
        out = {}
        for node in gm.graph.nodes:
            prec = self.lookup(node)
            if prec is not None:
                out[node.name] = prec
        return out

    def targets(self, gm: fx.GraphModule, kind: str) -> dict[fx.Node, LayerPrecision]:
        """The nodes of `gm` this plan runs in precision `kind`, in graph order (what a lowering rewrites)."""
        resolved = self.resolve(gm)
        return {n: resolved[n.name] for n in gm.graph.nodes if n.name in resolved and resolved[n.name].kind == kind}

    def validate(self, gm: fx.GraphModule) -> None:
        """Raise PlanError (one line) for keys naming nothing in `gm` or for unsupported op/precision pairs."""
        nodes = {n.name: n for n in gm.graph.nodes}
        paths = {p for n in gm.graph.nodes for p in module_paths(n)}
        for key, prec in self._entries.items():
            if key == "*":
                continue
            if key.startswith("@"):
                if key[1:] not in KINDS:
                    raise PlanError(f"plan key '{key}': unknown op kind; valid: {', '.join('@' + k for k in KINDS)}")
                if key[1:] not in SUPPORTED[prec.kind]:
                    raise PlanError(f"plan key '{key}': {key[1:]} cannot run in {prec}; "
                                    f"valid precisions: {_valid_for(key[1:])}")
                continue
            if key in nodes:
                kind = op_kind(nodes[key])
                if prec.kind != "fp32" and (kind is None or kind not in SUPPORTED[prec.kind]):
                    raise PlanError(f"plan key '{key}': node {_describe(nodes[key])} cannot run in {prec}; "
                                    f"valid precisions: {_valid_for(kind)}")
                continue
            if key in paths:
                continue
            choices = [n.name for n in gm.graph.nodes if op_kind(n)] + sorted(paths)
            shown = ", ".join(choices[:12]) + (f", ... ({len(choices)} in all)" if len(choices) > 12 else "")
            raise PlanError(f"plan key '{key}' names no node or module of the graph; valid: {shown or 'none'}")

    # -- serialisation and display ------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"version": 1, "entries": {k: str(v) for k, v in sorted(self._entries.items())}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrecisionPlan":
        data = json.loads(text)
        if not isinstance(data, dict) or "entries" not in data:
            raise PlanError("plan JSON must be an object with 'entries'; got keys: "
                            + ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__)
        return cls(data["entries"])

    def table(self, gm: fx.GraphModule | None = None) -> str:
        """A printable table: the entries, or with `gm` every covered node, its op kind and precision."""
        if gm is None:
            rows = [(k, "", str(v)) for k, v in sorted(self._entries.items())]
        else:
            rows = [(n.name, op_kind(n) or "", str(p)) for n, p in ((n, self.lookup(n)) for n in gm.graph.nodes) if p]
        head = ("key" if gm is None else "node", "kind", "precision")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return f"PrecisionPlan({ {k: str(v) for k, v in self._entries.items()} })"

    def __eq__(self, other) -> bool:
        return isinstance(other, PrecisionPlan) and dict(self._entries) == dict(other._entries)

    def __hash__(self) -> int:
        return hash(self.to_json())


def _valid_for(kind: str | None) -> str:
    names = {"lmul": "lmul(m,l)", "lut": "lut(bits,group)"}
    return ", ".join(names.get(p, p) for p, kinds in SUPPORTED.items() if kind in kinds) or "fp32"


def _describe(node: fx.Node) -> str:
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"
