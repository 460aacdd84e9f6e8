"""From a MergeSpec and opened sources to a list of output-tensor jobs, checked before heavy work.

Every check that needs only headers runs here (shapes, dtypes, missing/extra tensors, vocab and
architecture compatibility, parameter names and ranges), so `--dry-run` and a real merge fail the
same way, before any tensor data is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .base import REQUIRED, MergeError, MergeMethod, Param
from .io import TensorSource
from .spec import Conditional, MergeSpec, evaluate_setting, setting_endpoints

LAYER_RE = re.compile(r"(^|\.)(layers|h|layer|blocks|block)\.(\d+)\.")
PRE_LAYER_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")


def layer_of(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(3)) if m else None


def with_layer(name: str, index: int) -> str:
    m = LAYER_RE.search(name)
    assert m is not None
    return name[: m.start(3)] + str(index) + name[m.end(3):]


@dataclass
class Ref:
    """One input tensor of a job: which model (by position in `Plan.sources`) and which name."""

    source: int
    name: str
    settings: list[Mapping[str, Any] | None] = field(default_factory=list)  # highest precedence first


@dataclass
class Job:
    out_name: str
    base: Ref | None
    experts: list[Ref]
    t: float
    layer_index: int | None
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    copy: bool = False  # non-float tensors and single-source passthrough are copied, not merged
    # settings of global-scope parameters, highest precedence first (slice's, then the config's): like
    # mergekit, they are resolved per tensor, so a global `t: [0, 1]` or `{filter: mlp, ...}` applies here
    settings: list[Mapping[str, Any] | None] = field(default_factory=list)


@dataclass
class Plan:
    spec: MergeSpec
    method: MergeMethod
    sources: list[TensorSource]
    global_params: dict[str, Any]
    jobs: list[Job]
    num_layers: int | None
    out_num_layers: int | None
    config_source: TensorSource | None
    memory: dict[str, Any] = field(default_factory=dict)  # in-memory models and aux tensors by label


_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def numeric_strings(setting: Any, param: Param) -> Any:
    """PyYAML reads `1e-3` (no dot) as a string; a numeric parameter takes it as a number, as mergekit
    does (its pydantic validation runs before interpolation), so gradients of such values interpolate."""
    if param.kind not in (int, float):
        return setting
    if isinstance(setting, str) and _NUMBER.fullmatch(setting):
        return float(setting)
    if isinstance(setting, Conditional):
        return setting.model_copy(update={"value": numeric_strings(setting.value, param)})
    if isinstance(setting, list):
        return [numeric_strings(v, param) for v in setting]
    return setting


def resolve(param: Param, settings: list[Mapping[str, Any] | None], tensor: str, t: float, where: str) -> Any:
    for s in settings:
        if s and param.name in s:
            value = evaluate_setting(numeric_strings(s[param.name], param), tensor, t)
            if value is not None:
                return param.validate(value, where)
    if param.default is REQUIRED:
        raise MergeError(f"{where}: parameter {param.name!r} is required for this method")
    return param.default


def _check_settings(spec: MergeSpec, method: MergeMethod) -> None:
    """Unknown names and out-of-range values anywhere in the config, before any tensor is read."""
    specs = {p.name: p for p in method.param_specs()}
    allowed = set(specs) | set(method.aux_inputs)
    blocks: list[tuple[str, Mapping[str, Any] | None]] = [("parameters", spec.parameters)]
    blocks += [(f"models[{i}] ({m.model})", m.parameters) for i, m in enumerate(spec.models or [])]
    for i, s in enumerate(spec.slices or []):
        blocks.append((f"slices[{i}]", s.parameters))
        blocks += [(f"slices[{i}].sources[{j}] ({src.model})", src.parameters) for j, src in enumerate(s.sources)]
    for where, block in blocks:
        for key, setting in (block or {}).items():
            if key not in allowed:
                valid = ", ".join(sorted(allowed)) or "none"
                raise MergeError(f"{where}: unknown parameter {key!r} for method {method.name!r}; valid: {valid}")
            if key in specs:
                for v in setting_endpoints(numeric_strings(setting, specs[key])):
                    specs[key].validate(v, f"{where}")


def _num_layers(src: TensorSource) -> int | None:
    cfg = src.config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    idx = [i for n in src.index if (i := layer_of(n)) is not None]
    return max(idx) + 1 if idx else None


def _check_compatible(sources: list[TensorSource], refs: list[str]) -> None:
    first = sources[0].config()
    for src, ref in zip(sources[1:], refs[1:]):
        cfg = src.config()
        if first and cfg:
            a, b = first.get("model_type"), cfg.get("model_type")
            if a and b and a != b:
                raise MergeError(f"{ref}: architecture {b!r} differs from {refs[0]}'s {a!r}; all models must share one")
            va, vb = first.get("vocab_size"), cfg.get("vocab_size")
            if va and vb and va != vb:
                raise MergeError(f"{ref}: vocab_size {vb} differs from {refs[0]}'s {va}; merge models with one tokenizer")


def _tensor_check(job_name: str, refs: list[Ref], sources: list[TensorSource], model_refs: list[str]) -> tuple[tuple[int, ...], torch.dtype]:
    first = refs[0]
    meta0 = sources[first.source].index.get(first.name)
    for r in refs:
        src = sources[r.source]
        meta = src.index.get(r.name)
        if meta is None:
            raise MergeError(f"{src.where(r.name)}: tensor {r.name!r} is missing (present in {model_refs[first.source]})")
        assert meta0 is not None
        if meta.shape != meta0.shape:
            what = "different vocab sizes" if any(h in r.name for h in ("embed", "lm_head", "wte")) else "shape mismatch"
            raise MergeError(
                f"{src.where(r.name)}: tensor {r.name!r} has shape {list(meta.shape)}, "
                f"{model_refs[first.source]} has {list(meta0.shape)} ({what}); all models must agree"
            )
        if meta.dtype.is_floating_point != meta0.dtype.is_floating_point:
            raise MergeError(f"{src.where(r.name)}: tensor {r.name!r} is {meta.dtype}, {model_refs[first.source]} has {meta0.dtype}")
    assert meta0 is not None
    return meta0.shape, meta0.dtype


def build_plan(spec: MergeSpec, method: MergeMethod, sources: list[TensorSource], model_refs: list[str]) -> Plan:
    _check_settings(spec, method)
    pos = {ref: i for i, ref in enumerate(model_refs)}
    base_idx = pos.get(spec.base_model) if spec.base_model else None
    if method.requires_base and base_idx is None:
        raise MergeError(f"method {method.name!r} needs base_model; set base_model in the config")
    gp = {p.name: resolve(p, [spec.parameters], "", 0.0, "parameters") for p in method.param_specs() if p.scope == "global"}
    _check_compatible(sources, model_refs)
    if spec.models:
        jobs, n_layers, out_layers = _jobs_for_models(spec, sources, model_refs, pos, base_idx)
    else:
        jobs, n_layers, out_layers = _jobs_for_slices(spec, sources, model_refs, pos, base_idx)
    config_source = sources[base_idx] if base_idx is not None else sources[0]
    plan = Plan(spec, method, sources, gp, jobs, n_layers, out_layers, config_source)
    _check_model_params(plan)
    return plan


def _jobs_for_models(spec, sources, model_refs, pos, base_idx):
    experts = [m for m in spec.models if pos[m.model] != base_idx]
    base_settings = [m.parameters for m in spec.models if pos[m.model] == base_idx]
    order_src = base_idx if base_idx is not None else pos[spec.models[0].model]
    names = list(sources[order_src].index)
    all_idx = ([base_idx] if base_idx is not None else []) + [pos[m.model] for m in experts]
    for i in all_idx:  # extra tensors are an error too, named with their file
        extra = [n for n in sources[i].index if n not in sources[order_src].index]
        if extra:
            raise MergeError(f"{sources[i].where(extra[0])}: extra tensor {extra[0]!r} not in {model_refs[order_src]}")
    n_layers = _num_layers(sources[order_src])
    jobs = []
    for name in names:
        li = layer_of(name)
        t = 0.0 if li is None else (li / (n_layers - 1) if n_layers and n_layers > 1 else 1.0)
        base = Ref(base_idx, name, [base_settings[0] if base_settings else None, spec.parameters]) if base_idx is not None else None
        exps = [Ref(pos[m.model], name, [m.parameters, spec.parameters]) for m in experts]
        refs = ([base] if base else []) + exps
        shape, dtype = _tensor_check(name, refs, sources, model_refs)
        jobs.append(Job(name, base, exps, t, li, shape, dtype, copy=not dtype.is_floating_point, settings=[spec.parameters]))
    return jobs, n_layers, n_layers


def _jobs_for_slices(spec, sources, model_refs, pos, base_idx):
    first_src = pos[spec.slices[0].sources[0].model]
    names = list(sources[first_src].index)
    layer_names = sorted({n for n in names if layer_of(n) is not None}, key=lambda n: (layer_of(n), n))
    templates = [n for n in layer_names if layer_of(n) == layer_of(layer_names[0])] if layer_names else []
    pre = [n for n in names if layer_of(n) is None and any(h in n for h in PRE_LAYER_HINTS)]
    post = [n for n in names if layer_of(n) is None and n not in pre]
    n_layers = _num_layers(sources[first_src])

    def slice_base(s):
        return pos[s.base_model] if s.base_model else base_idx

    def refs_for(s, name_for, t):
        b = slice_base(s)
        base = None
        exps = []
        for src in s.sources:
            r = Ref(pos[src.model], name_for(src), [src.parameters, s.parameters, spec.parameters])
            if pos[src.model] == b and base is None:
                base = r
            else:
                exps.append(r)
        if base is None and b is not None:
            base = Ref(b, name_for(s.sources[0]), [s.parameters, spec.parameters])
        return base, exps

    jobs: list[Job] = []

    def add(out_name, base, exps, t, li, s):
        refs = ([base] if base else []) + exps
        shape, dtype = _tensor_check(out_name, refs, sources, model_refs)
        single = len(refs) == 1
        jobs.append(Job(out_name, base, exps, t, li, shape, dtype, copy=single or not dtype.is_floating_point,
                        settings=[s.parameters, spec.parameters]))

    for name in pre:
        add(name, *refs_for(spec.slices[0], lambda src: name, 0.0), 0.0, None, spec.slices[0])
    out_layer = 0
    for s in spec.slices:
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        for off in range(length):
            t = off / (length - 1) if length > 1 else 1.0
            for tmpl in templates:
                for src in s.sources:
                    if n_layers is not None and src.layer_range[1] > _num_layers(sources[pos[src.model]]):
                        raise MergeError(f"{src.model}: layer_range {list(src.layer_range)} exceeds its {_num_layers(sources[pos[src.model]])} layers")
                base, exps = refs_for(s, lambda src: with_layer(tmpl, src.layer_range[0] + off), t)
                add(with_layer(tmpl, out_layer), base, exps, t, out_layer, s)
            out_layer += 1
    for name in post:
        add(name, *refs_for(spec.slices[-1], lambda src: name, 0.0), 0.0, None, spec.slices[-1])
    return jobs, n_layers, out_layer


def _check_model_params(plan: Plan) -> None:
    """Resolve every per-model parameter of the first job of each layer once, so a missing required
    parameter fails here rather than halfway through the merge."""
    model_params = [p for p in plan.method.param_specs() if p.scope == "model"]
    seen: set[tuple[int, float]] = set()
    for job in plan.jobs:
        if job.copy:
            continue
        for r in job.experts:
            if (r.source, job.t) in seen:
                continue
            seen.add((r.source, job.t))
            where = f"{plan.sources[r.source].ref} ({job.out_name})"
            for p in model_params:
                resolve(p, r.settings, r.name, job.t, where)
