"""The contract every merge method implements.

A `MergeMethod` merges the tensors that share one output name. The engine resolves every
parameter for that name (per-model weights, densities, layer-interpolated lists, name filters)
before calling it, so a method sees plain Python values and float32 tensors only.

Experts are handed over as a re-iterable, lazily loaded sequence: iterating it reads one
expert tensor at a time from memory-mapped files, so a method that consumes it in one pass
(or a few passes) keeps peak memory at a few tensors regardless of the number of experts.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REQUIRED = object()  # sentinel default: the parameter must be given


class MergeError(ValueError):
    """A user-facing error: one line naming the file, tensor or option and what would be valid."""


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    `scope` is "global" (one value per merge) or "model" (one value per expert).
    `check` returns None when the value is valid, else a phrase saying what would be valid,
    e.g. "a number in (0, 1]".
    """

    name: str
    default: Any = REQUIRED
    scope: str = "global"
    kind: type = float
    check: Callable[[Any], str | None] | None = None
    doc: str = ""

    def validate(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"{where}: parameter {self.name!r} must be true or false, got {value!r}")
        elif self.kind in (float, int):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MergeError(f"{where}: parameter {self.name!r} must be a number, got {value!r}")
            value = self.kind(value)
            if isinstance(value, float) and not math.isfinite(value):
                raise MergeError(f"{where}: parameter {self.name!r} must be finite, got {value!r}")
        elif self.kind is str:
            if not isinstance(value, str):
                raise MergeError(f"{where}: parameter {self.name!r} must be a string, got {value!r}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise MergeError(f"{where}: parameter {self.name!r}={value!r} is out of range; valid: {problem}")
        return value


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], str | None]:
    """A `Param.check` for an interval; the message spells the interval in math notation."""
    text = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def check(v: Any) -> str | None:
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        return None if (ok_lo and ok_hi) else text

    return check


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)

    return check


class ExpertTensor:
    """One expert's tensor for the current name, with that expert's resolved parameters.

    `raw` is the tensor as stored (often bf16, memory-mapped); `tensor` is it in the merge's compute
    dtype, converted on first use. `delta_from(base)` lets the subtraction do the conversion (type
    promotion converts exactly), which saves a full pass over memory and gives identical values.
    """

    def __init__(self, model: str, index: int, tensor: torch.Tensor, params: Mapping[str, Any],
                 aux: Callable[[str], torch.Tensor | None] = lambda key: None,
                 compute_dtype: torch.dtype | None = None):
        self.model = model  # the model's identifier as written in the config (path or label)
        self.index = index  # position of the model in the config (stable, used for seeding)
        self.raw = tensor
        self.params = params
        self.aux = aux  # aux("fisher") / aux("gram"): per-expert auxiliary tensors for this name, or None
        self.compute_dtype = compute_dtype or tensor.dtype
        self._converted: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        if self.raw.dtype == self.compute_dtype:
            return self.raw
        if self._converted is None:
            self._converted = self.raw.to(self.compute_dtype)
        return self._converted

    def _fusable(self, base: torch.Tensor) -> bool:
        """The fused kernels compute in float32 and read float32/bf16/fp16 expert and base directly."""
        return (self.compute_dtype == torch.float32 and base.dtype in _FUSED_DTYPES
                and self.raw.dtype in _FUSED_DTYPES and self.raw.shape == base.shape)

    def delta_from(self, base: torch.Tensor) -> torch.Tensor:
        """τ = θ_expert − θ_base in the compute dtype (one fused pass for fp32 compute)."""
        if self._fusable(base):
            from ..ops.merge_kernels import merge_delta

            return merge_delta(self.raw, base)
        return self.tensor - base

    def accumulate_delta(self, acc: torch.Tensor | None, base: torch.Tensor, weight: float) -> torch.Tensor:
        """acc + (θ_expert − θ_base)·w, rounded like the separate ops (acc None: start from zero)."""
        if self._fusable(base):
            from ..ops.merge_kernels import merge_axpy_delta_, merge_scaled_delta

            if acc is None:
                return merge_scaled_delta(self.raw, base, weight)
            return merge_axpy_delta_(acc, self.raw, base, weight)
        term = (self.tensor - base) * torch.tensor(weight, dtype=base.dtype)
        return term if acc is None else acc.add_(term)

    def __repr__(self) -> str:
        return f"ExpertTensor({self.model!r}, index={self.index}, shape={tuple(self.raw.shape)}, params={dict(self.params)})"


class Experts(Sequence[ExpertTensor]):
    """A re-iterable sequence of experts; each access loads (mmap) one tensor."""

    def __init__(self, count: int, load: Callable[[int], ExpertTensor],
                 release: Callable[[int], None] | None = None):
        self._count = count
        self._load = load
        self._release = release  # called once iteration has moved past expert i (drops its mapped pages)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._load(j) for j in range(*i.indices(self._count))]
        if not -self._count <= i < self._count:
            raise IndexError(i)
        return self._load(i % self._count)

    def __iter__(self) -> Iterator[ExpertTensor]:
        for i in range(self._count):
            yield self._load(i)
            if self._release is not None:
                self._release(i)


class TensorInputs:
    """Everything a method sees for one output tensor name.

    `base` is the base tensor in the compute dtype, converted on first use; `base_stored` is it as
    read (often bf16, memory-mapped). Fused kernels that convert while they read take `base_stored`
    and so skip a conversion pass over the base (bf16/fp16 -> fp32 is exact: the values are equal).
    """

    def __init__(self, name: str, base: torch.Tensor | None, experts: Experts, seed: int = 0,
                 base_params: Mapping[str, Any] | None = None, layer_index: int | None = None,
                 num_layers: int | None = None, out_dtype: torch.dtype | None = None, *,
                 compute_dtype: torch.dtype | None = None, on_base_converted: Callable[[], None] | None = None):
        self.name = name
        self.base_stored = base
        self.experts = experts
        self.seed = seed
        self.base_params: Mapping[str, Any] = dict(base_params or {})
        self.layer_index = layer_index  # parsed from the name (".layers.N."), None when not a layer tensor
        self.num_layers = num_layers
        # the dtype the engine writes; a method may return it directly (saving the engine a cast pass)
        self.out_dtype = out_dtype
        self.compute_dtype = compute_dtype or (base.dtype if base is not None else torch.float32)
        self._on_base_converted = on_base_converted  # the engine drops the stored base's mapped pages
        self._base: torch.Tensor | None = None

    @property
    def base(self) -> torch.Tensor | None:
        """The base in the compute dtype (None when the merge has no base model)."""
        if self.base_stored is None or self.base_stored.dtype == self.compute_dtype:
            return self.base_stored
        if self._base is None:
            self._base = self.base_stored.to(self.compute_dtype)
            if self._on_base_converted is not None:
                self._on_base_converted()
        return self._base

    def fused_base(self) -> torch.Tensor | None:
        """The base for the fused float32 kernels: as stored when they can read its dtype directly."""
        b = self.base_stored
        if b is not None and self.compute_dtype == torch.float32 and b.dtype in _FUSED_DTYPES:
            return b
        return self.base

    def generator(self, salt: str = "") -> torch.Generator:
        """A CPU generator seeded by (seed, tensor name, salt): independent of order and threads."""
        digest = hashlib.sha256(f"{self.seed}\x00{self.name}\x00{salt}".encode()).digest()
        g = torch.Generator(device="cpu")
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return g

    def __repr__(self) -> str:
        shape = None if self.base_stored is None else tuple(self.base_stored.shape)
        return f"TensorInputs({self.name!r}, base={shape}, experts={len(self.experts)})"


class MergeMethod(ABC):
    """One merge algorithm over the tensors of one name.

    Subclasses set `name`, `reference_url`, `params` and implement `merge`. A family of methods that
    differ only by a setting is one class whose instances are configured with data and registered
    under different names (see `registry.py`).
    """

    name: str = ""
    reference_url: str = ""
    params: ClassVar[tuple[Param, ...]] = ()
    requires_base: bool = False
    # True when `merge` consumes experts one at a time (peak memory independent of the number of experts)
    streaming: bool = True
    # Names of per-expert auxiliary tensors the method needs ("fisher", "gram"); the engine checks them.
    aux_inputs: tuple[str, ...] = ()

    def param_specs(self) -> tuple[Param, ...]:
        return type(self).params

    def thread_invariant(self, params: Mapping[str, Any]) -> bool:
        """True when results cannot depend on torch's thread count: only elementwise ops and
        torchmerge's own kernels, no torch reductions (whose float sums are split by thread). The
        engine may then give a core to input hashing while merging."""
        return False

    @abstractmethod
    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        """Return the merged float32 tensor for `inputs.name`. `params` holds the global parameters."""

    def prepare(self, tensor_names: Sequence[str], load_all: Callable[[str], TensorInputs], params: Mapping[str, Any]) -> None:
        """Optional pass over all names before merging (e.g. TIES trimming over the whole model)."""

    def __repr__(self) -> str:
        return f"<MergeMethod {self.name}>"
