"""The merge engine: spec → checked plan → one output tensor at a time → atomic output directory.

Peak memory is a few tensors: experts are read lazily through memory maps, methods consume them
one at a time, and the writer streams into pre-laid-out shards.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from . import registry
from .base import MergeError, Experts, ExpertTensor, TensorInputs
from .io import TensorSource, copy_config_files, open_model
from .plan import Job, Plan, build_plan, resolve
from .spec import MergeSpec
from .writer import OutTensor, ShardedWriter, parse_size, sha256_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (what to merge is the MergeSpec)."""

    dtype: str | None = None  # compute dtype; overrides the spec's `dtype`
    out_dtype: str | None = None
    seed: int | None = None  # overrides the spec's `seed`
    shard_size: str | int = "5GB"
    force: bool = False
    quiet: bool = False
    allow_pickle: bool = False
    check_finite_inputs: bool = False  # scan every input tensor (dry-run does); else outputs are checked
    # Keep freed tensor memory in this process's heap (glibc mallopt) instead of returning it to the
    # OS after every tensor: fresh pages cost a fault each, which made elementwise work 3-6x slower.
    reuse_heap_memory: bool = True


def _keep_freed_memory_in_heap() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)  # larger ones (embeddings) map fresh: no fragmentation
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`: one read-only pass over its bits (torchmerge::all_finite)."""
    from ..ops.merge_kernels import all_finite as _all_finite

    return _all_finite(t)


def load_spec(spec_or_path: Any) -> tuple[MergeSpec, dict[str, Any]]:
    """A MergeSpec, a YAML path or a dict; dict entries whose `model` is an nn.Module or a
    state_dict are replaced by labels and returned in the memory map."""
    if isinstance(spec_or_path, MergeSpec):
        return spec_or_path, {}
    if isinstance(spec_or_path, (str, Path)):
        return MergeSpec.from_yaml(spec_or_path), {}
    if not isinstance(spec_or_path, Mapping):
        raise MergeError(f"expected a MergeSpec, a YAML path or a dict, got {type(spec_or_path).__name__}")
    data = json.loads(json.dumps(spec_or_path, default=lambda o: f"<{id(o)}>"))
    memory: dict[str, Any] = {}

    def label(obj: Any) -> Any:
        if isinstance(obj, str) or obj is None:
            return obj
        key = f"<{id(obj)}>"
        memory[key] = obj
        return key

    src = dict(spec_or_path)
    data["base_model"] = label(src.get("base_model"))
    for m_out, m_in in zip(data.get("models") or [], src.get("models") or []):
        m_out["model"] = label(m_in["model"])
    for s_out, s_in in zip(data.get("slices") or [], src.get("slices") or []):
        for a, b in zip(s_out["sources"], s_in["sources"]):
            a["model"] = label(b["model"])
    for blocks_out, blocks_in in zip(data.get("models") or [], src.get("models") or []):
        for k, v in (blocks_in.get("parameters") or {}).items():
            if isinstance(v, Mapping):  # in-memory aux tensors (fisher / gram) by label
                blocks_out["parameters"][k] = label(v)
    return MergeSpec.from_dict(data), memory


def prepare(spec_or_path: Any, options: MergeOptions = MergeOptions()) -> Plan:
    """Open every input from headers and build the checked plan (no tensor data read)."""
    spec, memory = load_spec(spec_or_path)
    if options.seed is not None or options.dtype or options.out_dtype:
        update = {k: v for k, v in (("seed", options.seed), ("dtype", options.dtype), ("out_dtype", options.out_dtype)) if v is not None}
        spec = MergeSpec.from_dict({**spec.model_dump(), **update})
    method = registry.get(spec.merge_method)
    refs = spec.referenced_models()
    sources: list[TensorSource] = []
    base_src = None
    if spec.base_model:
        base_src = open_model(spec.base_model, allow_pickle=options.allow_pickle, memory=memory)
    for ref in refs:
        if ref == spec.base_model:
            sources.append(base_src)
        else:
            sources.append(open_model(ref, allow_pickle=options.allow_pickle, memory=memory, lora_base=base_src))
    plan = build_plan(spec, method, sources, refs)
    plan.memory = memory
    return plan


class _Runner:
    def __init__(self, plan: Plan, options: MergeOptions):
        self.plan = plan
        self.options = options
        spec = plan.spec
        self.compute = DTYPES[spec.dtype] if spec.dtype else torch.float32
        self.out_dtype = DTYPES[spec.out_dtype or spec.dtype] if (spec.out_dtype or spec.dtype) else None
        self.aux_sources: dict[str, TensorSource] = {}
        self.model_params = [p for p in plan.method.param_specs() if p.scope == "model"]

    def out_meta(self, job: Job) -> OutTensor:
        dtype = job.in_dtype if (job.copy and not job.in_dtype.is_floating_point) else (self.out_dtype or job.in_dtype)
        return OutTensor(job.out_name, job.shape, dtype)

    def _load(self, ref, job: Job) -> torch.Tensor:
        src = self.plan.sources[ref.source]
        t = src.load(ref.name)
        if self.options.check_finite_inputs and not all_finite(t):
            raise MergeError(f"{src.where(ref.name)}: tensor {ref.name!r} contains NaN or Inf; inputs must be finite")
        return t

    def _aux(self, ref, key: str, job: Job):
        setting = None
        for s in ref.settings:
            if s and key in s:
                setting = s[key]
                break
        if setting is None:
            return lambda k: None
        memory = self.plan.memory

        def get(k: str) -> torch.Tensor | None:
            if k != key:
                return None
            if setting in memory:
                t = memory[setting].get(job.out_name)
                return None if t is None else t.to(self.compute)
            if setting not in self.aux_sources:
                self.aux_sources[setting] = open_model(str(setting))
            src = self.aux_sources[setting]
            return src.load(job.out_name).to(self.compute) if job.out_name in src.index else None

        return get

    def inputs(self, job: Job) -> TensorInputs:
        plan = self.plan
        base_params = {}
        if job.base is not None:
            base_params = {p.name: resolve(p, job.base.settings, job.base.name, job.t, plan.sources[job.base.source].ref)
                           for p in self.model_params if any(s and p.name in s for s in job.base.settings[:1])}

        def load_expert(i: int) -> ExpertTensor:
            r = job.experts[i]
            where = f"{plan.sources[r.source].ref} ({job.out_name})"
            # per-model settings see the input tensor's name (its own layer index in a slice), as mergekit
            params = {p.name: resolve(p, r.settings, r.name, job.t, where) for p in self.model_params}
            aux_fns = {k: self._aux(r, k, job) for k in plan.method.aux_inputs}
            return ExpertTensor(plan.sources[r.source].ref, r.source, self._load(r, job), params,
                                aux=lambda k, fns=aux_fns: fns[k](k) if k in fns else None, compute_dtype=self.compute)

        base = None if job.base is None else self._load(job.base, job)
        base_source = None if job.base is None else plan.sources[job.base.source]
        def release_expert(i: int) -> None:  # a re-read after this faults the pages back in from the file
            plan.sources[job.experts[i].source].release()

        # the base stays as stored until a method asks for it in the compute dtype; once converted,
        # its mapped pages are no longer needed
        return TensorInputs(job.out_name, base, Experts(len(job.experts), load_expert, release_expert), plan.spec.seed,
                            base_params, job.layer_index, plan.out_num_layers, self.out_meta(job).dtype,
                            compute_dtype=self.compute, on_base_converted=base_source and base_source.release)

    def finish_one(self, job: Job) -> torch.Tensor:
        """Merge one job, cast it to the output dtype and check it is finite (it may alias a mapped
        input until `release`). The check runs on the cast result: fewer bytes, and NaN/Inf survive
        the cast (a finite value that overflows the output dtype is caught too)."""
        out = self.merge_one(job).to(self.out_meta(job).dtype)
        if not all_finite(out):
            self._name_non_finite(job)
        return out

    def release(self) -> None:
        """Drop the inputs' mapped pages read for the last job."""
        for src in self.plan.sources:
            src.release()

    def global_params(self, job: Job) -> dict[str, Any]:
        """Global-scope parameters for this tensor (gradients and filters resolved per tensor, as mergekit)."""
        if not job.settings:
            return self.plan.global_params
        return {p.name: resolve(p, job.settings, job.out_name, job.t, "parameters")
                for p in self.plan.method.param_specs() if p.scope == "global"}

    def merge_one(self, job: Job) -> torch.Tensor:
        if job.copy:
            return self._load(job.base or job.experts[0], job)
        return self.plan.method.merge(self.inputs(job), self.global_params(job))

    def _name_non_finite(self, job: Job) -> None:
        for ref in ([job.base] if job.base else []) + job.experts:
            t = self.plan.sources[ref.source].load(ref.name)
            if not all_finite(t):
                raise MergeError(f"{self.plan.sources[ref.source].where(ref.name)}: tensor {ref.name!r} contains NaN or Inf; inputs must be finite")
        raise MergeError(f"method {self.plan.method.name!r} produced NaN/Inf for tensor {job.out_name!r} from finite "
                         f"inputs (or overflowed the output dtype {self.out_meta(job).dtype}); check its parameters and out_dtype")


def describe(plan: Plan) -> str:
    spec = plan.spec
    lines = [f"method: {plan.method.name}  ({plan.method.reference_url})"]
    lines.append(f"base: {spec.base_model or '-'}")
    for s in plan.sources:
        lines.append(f"  input: {s.ref}  ({len(s.index)} tensors)")
    n_merge = sum(not j.copy for j in plan.jobs)
    total = sum(OutTensor(j.out_name, j.shape, torch.float32).nbytes // 4 for j in plan.jobs)
    lines.append(f"output: {len(plan.jobs)} tensors ({n_merge} merged, {len(plan.jobs) - n_merge} copied), {total:,} parameters")
    if plan.global_params:
        lines.append("parameters: " + ", ".join(f"{k}={v}" for k, v in plan.global_params.items()))
    lines.append(f"dtype: {spec.dtype or 'float32 (compute)'} -> {spec.out_dtype or spec.dtype or 'as inputs'}; seed {spec.seed}")
    return "\n".join(lines)


def dry_run(spec_or_path: Any, options: MergeOptions = MergeOptions()) -> str:
    """Validate every input (headers, shapes, dtypes, architecture, parameters, finite values) and
    describe the plan without writing anything."""
    plan = prepare(spec_or_path, options)
    runner = _Runner(plan, MergeOptions(**{**options.__dict__, "check_finite_inputs": True}))
    for job in tqdm(plan.jobs, desc="checking", disable=options.quiet, file=sys.stderr):
        for ref in ([job.base] if job.base else []) + job.experts:
            runner._load(ref, job)
        runner.release()
    return describe(plan)


def run_merge(spec_or_path: Any, out: str | Path | None = None, options: MergeOptions | None = None, **kw: Any):
    """Merge. Returns the merged state_dict when `out` is None, else the written directory."""
    options = options or MergeOptions(**kw)
    return execute(prepare(spec_or_path, options), out, options)


def execute(plan: Plan, out: str | Path | None, options: MergeOptions = MergeOptions()):
    """Run a prepared plan: the state_dict when `out` is None, else the written directory."""
    if options.reuse_heap_memory:
        _keep_freed_memory_in_heap()
    runner = _Runner(plan, options)
    by_name = {j.out_name: j for j in plan.jobs}
    plan.method.prepare([j.out_name for j in plan.jobs if not j.copy], lambda n: runner.inputs(by_name[n]), plan.global_params)
    progress = dict(desc=f"merging ({plan.method.name})", unit="tensor", disable=options.quiet, file=sys.stderr)
    if out is None:  # clone: results must not alias memory-mapped inputs
        merged = {}
        for j in tqdm(plan.jobs, **progress):
            merged[j.out_name] = runner.finish_one(j).clone()
            runner.release()
        return merged
    return _write(plan, runner, Path(out), options, progress)


def _write(plan: Plan, runner: _Runner, out: Path, options: MergeOptions, progress: dict) -> Path:
    writer = ShardedWriter(out, [runner.out_meta(j) for j in plan.jobs], parse_size(options.shard_size), options.force)
    inputs = sorted({f for s in plan.sources for f in s.files})
    try:
        # one helper thread hashes the inputs, then the output shards right behind the writer
        lend = plan.method.thread_invariant(plan.global_params)
        with ThreadPoolExecutor(max_workers=1) as pool, _SharedCores() as cores:
            try:
                input_hashes = pool.submit(lambda: {str(f): sha256_file(f) for f in inputs})
                shard_hashes = pool.submit(writer.hash_as_written)
                for job in tqdm(plan.jobs, **progress):
                    cores.lend_one(lend and not input_hashes.done())
                    writer.write(job.out_name, runner.finish_one(job))
                    runner.release()
                copy_config_files(plan.config_source.config_dir if plan.config_source else None, writer.tmp)
                _fix_config(writer.tmp, plan)
                (writer.tmp / "mergekit_config.yml").write_text(plan.spec.to_yaml())
                writer.close_shards()  # the index and every other output file exist before they are hashed
                manifest = _manifest(plan, input_hashes.result(), shard_hashes.result(), writer.tmp)
                writer.add_file("merge_manifest.json", json.dumps(manifest, indent=2).encode())
            except BaseException:
                writer.abort()  # before the pool waits for its thread: stops the shard hashing
                raise
        return writer.finish()
    except OSError as e:
        writer.abort()
        code = e.errno if e.errno is not None else (e.args[0] if len(e.args) == 1 and isinstance(e.args[0], int) else None)
        reason = e.strerror or (os.strerror(code) if code is not None else str(e))  # OSError(ENOSPC) has no strerror
        raise MergeError(f"{out}: writing failed ({reason}); nothing was written") from None
    except BaseException:
        writer.abort()
        raise


class _SharedCores:
    """While the input hasher runs, torch's kernels use one thread fewer (at least one), for methods
    whose results do not depend on the thread count (MergeMethod.thread_invariant).

    The hasher keeps one core busy; with every core also in torch's OpenMP team, each parallel
    kernel waits for the thread that shares a core with the hasher (and spinning workers steal
    that core back), which made a task-arithmetic merge on 2 cores about 2x slower."""

    def __enter__(self) -> "_SharedCores":
        self.full = torch.get_num_threads()
        self.lent = False
        return self

    def lend_one(self, lend: bool) -> None:
        if lend != self.lent and self.full > 1:
            torch.set_num_threads(self.full - 1 if lend else self.full)
            self.lent = lend

    def __exit__(self, *exc: object) -> None:
        self.lend_one(False)


def _fix_config(tmp: Path, plan: Plan) -> None:
    cfg_path = tmp / "config.json"
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text())
    if plan.out_num_layers is not None and "num_hidden_layers" in cfg:
        cfg["num_hidden_layers"] = plan.out_num_layers
    if plan.spec.out_dtype or plan.spec.dtype:
        cfg["torch_dtype"] = plan.spec.out_dtype or plan.spec.dtype
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _manifest(plan: Plan, input_hashes: dict[str, str], shard_hashes: dict[str, str], tmp: Path) -> dict:
    from .. import __version__

    outputs = {f.name: shard_hashes.get(f.name) or sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    return {
        "torchmerge_version": __version__,
        "method": plan.method.name,
        "reference_url": plan.method.reference_url,
        "parameters": plan.global_params,
        "seed": plan.spec.seed,
        "spec": plan.spec.model_dump(mode="json", exclude_none=True),
        "inputs": input_hashes,
        "outputs": outputs,
    }
