"""MergeSpec: the frozen, validated, serialisable description of a merge.

The schema is mergekit's YAML (merge_method, base_model, models[].model/parameters, slices with
layer_range, global parameters, dtype, out_dtype), plus torchmerge's `seed`. Parameter settings
keep mergekit's forms: a scalar, a list (a gradient interpolated over layers), or conditionals
`[{filter: "mlp", value: ...}, {value: ...}]` matched by substring of the tensor name, first match wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .base import MergeError

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class Conditional(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    value: ScalarOrGradient
    filter: Optional[str] = None


Setting = Union[Conditional, list[Conditional], ScalarOrGradient]

DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def _norm_dtype(v: Optional[str]) -> Optional[str]:
    if v is None:
        return None
    v = _DTYPE_ALIASES.get(str(v), str(v))
    if v not in DTYPES:
        raise ValueError(f"dtype {v!r} is not supported; valid: {', '.join(DTYPES)}")
    return v


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelInput(_Frozen):
    model: str
    parameters: Optional[dict[str, Setting]] = None


class SliceSource(_Frozen):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Setting]] = None

    @field_validator("layer_range")
    @classmethod
    def _range_ok(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(_Frozen):
    sources: list[SliceSource]
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Setting]] = None

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if not self.sources or len(lengths) != 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        return self


class MergeSpec(_Frozen):
    """A merge, as written in a mergekit-style YAML file."""

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[ModelInput]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[dict[str, Setting]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    seed: int = 0
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None

    _dtype_ok = field_validator("dtype", "out_dtype")(classmethod(lambda cls, v: _norm_dtype(v)))

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_ok(cls, v: Optional[str]) -> Optional[str]:
        if v not in (None, "base"):
            raise ValueError(f"tokenizer_source {v!r} is not supported; valid: 'base' (or leave it out)")
        return v

    @model_validator(mode="after")
    def _one_input_form(self) -> "MergeSpec":
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        return self

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "MergeSpec":
        if not isinstance(data, dict):
            raise MergeError(f"{where}: expected a mapping with 'merge_method' and 'models' or 'slices'")
        if "modules" in data:
            raise MergeError(f"{where}: 'modules' (multi-module merges) is not supported; use 'models' or 'slices'")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            raise MergeError(f"{where}: {loc}: {msg}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MergeSpec":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise MergeError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise MergeError(f"{path}:{line} is not valid YAML ({getattr(e, 'problem', e)})") from None
        spec = cls.from_dict(data, where=str(path))
        return spec.resolve_paths(path.parent)

    def resolve_paths(self, root: Path) -> "MergeSpec":
        """Model paths in a YAML file are relative to the file's folder (when that file exists)."""

        def fix(ref: Optional[str]) -> Optional[str]:
            if ref is None:
                return None
            parts = ref.split("+")
            fixed = [str((root / p)) if not Path(p).is_absolute() and (root / p).exists() else p for p in parts]
            return "+".join(fixed)

        data = self.model_dump()
        data["base_model"] = fix(data["base_model"])
        for m in data.get("models") or []:
            m["model"] = fix(m["model"])
        for s in data.get("slices") or []:
            s["base_model"] = fix(s["base_model"])
            for src in s["sources"]:
                src["model"] = fix(src["model"])
        return MergeSpec.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    # ---- queries ------------------------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        refs: list[str] = []
        for r in [self.base_model] + [m.model for m in self.models or []]:
            if r is not None and r not in refs:
                refs.append(r)
        for s in self.slices or []:
            for r in [s.base_model] + [src.model for src in s.sources]:
                if r is not None and r not in refs:
                    refs.append(r)
        return refs


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve one parameter setting for a tensor: conditionals by substring filter (first match,
    `*` or no filter matches all), gradients by linear interpolation at t ∈ [0, 1] between the
    list's evenly spaced points (non-numeric lists pick the point at floor(t·(n−1))), exactly as
    mergekit 0.1.5 does. Returns None when no conditional matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, Conditional) for c in setting):
        for cond in setting:
            if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def setting_endpoints(setting: Any) -> list[Any]:
    """Every literal value a setting can take at its endpoints (used to validate ranges up front:
    interpolation between valid endpoints stays valid for interval constraints)."""
    if isinstance(setting, Conditional):
        return setting_endpoints(setting.value)
    if isinstance(setting, list):
        out: list[Any] = []
        for v in setting:
            out.extend(setting_endpoints(v))
        return out
    return [setting]
