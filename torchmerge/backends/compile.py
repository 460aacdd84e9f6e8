"""The `torchmerge` torch.compile backend: AOTAutograd → torchmerge PassPipeline → inductor (or eager).

Dynamo hands us a torch-level graph; AOTAutograd turns it into a functional core-ATen forward graph (the
same opset `torchmerge.graph.capture` produces). For inference graphs, parameters and buffers become
`get_attr` constants (like inductor's freezing) so the fold passes can evaluate weight-only subgraphs and
the lowering passes can pack weights once. The rewritten graph goes to inductor (re-decomposed with its
table) or runs as is ("eager"). The pipeline's uuid is part of inductor's FX graph cache key through the
`post_grad_custom_post_pass` slot, so changing a pass or its options never hits a stale cache entry.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..graph.pass_base import GraphPass
from ..graph.pipeline import PassPipeline, PipelineOptions
from ..passes import DeadCodeElimination, FoldBatchNorm, FoldConstants, FoldLoRA, FoldMergedWeights
from ..passes.calibrate import Calibrate, CalibrationData, graph_args
from ..passes.lower_int8 import LowerInt8
from ..passes.lower_lut import LowerLUT
from ..passes.lowering import lowering_passes
from ..precision.plan import PrecisionPlan

INNER = ("inductor", "eager")


class BackendOptionError(ValueError):
    """An option given to the torchmerge backend is unknown or invalid."""


@dataclass(frozen=True)
class CompileOptions:
    """What the backend does. `passes` replaces the default pipeline; `inner`: inductor | eager."""

    plan: PrecisionPlan | None = None
    passes: tuple[GraphPass, ...] | None = None
    inner: str = "inductor"
    dump_dir: str | Path | None = None
    # int8, lut: batches (tuples of the model's tensor inputs); int8 default: the call's inputs. In torch.compile's
    # options dict pass a CalibrationData (compared by identity; dynamo cannot compare tensors between compiles)
    calibration: tuple | None = None

    def __post_init__(self):
        if self.inner not in INNER:
            raise BackendOptionError(f"torchmerge backend option inner={self.inner!r}; valid: {', '.join(INNER)}")
        if self.plan is not None and not isinstance(self.plan, PrecisionPlan):
            raise BackendOptionError(f"torchmerge backend option plan is a {type(self.plan).__name__}; "
                                     "valid: a torchmerge.precision.plan.PrecisionPlan")

    @classmethod
    def from_any(cls, options: "CompileOptions | dict | None" = None, **kw) -> "CompileOptions":
        if isinstance(options, CompileOptions) and not kw:
            return options
        merged = {**(dataclasses.asdict(options) if isinstance(options, CompileOptions) else options or {}), **kw}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(merged) - set(valid))
        if unknown:
            raise BackendOptionError(f"torchmerge backend: unknown option '{unknown[0]}'; valid: {', '.join(valid)}")
        if merged.get("passes") is not None:
            merged["passes"] = tuple(merged["passes"])
        if merged.get("calibration") is not None:  # a CalibrationData or a list of batches (tuples of tensors)
            merged["calibration"] = CalibrationData(merged["calibration"]).batches
        return cls(**merged)


def default_passes(plan: PrecisionPlan | None = None, calibration: tuple | None = None) -> list[GraphPass]:
    """Fold merges, adapters, batch norms and weight-only subgraphs; calibrate (int8); lower per plan; fold casts;
    clean up. `calibration`: batches of graph inputs (placeholder order) for the Calibrate pass."""
    lowerings = lowering_passes(plan)
    if calibration and any(isinstance(p, LowerInt8) for p in lowerings):
        lowerings = [Calibrate(tuple(calibration)), *lowerings]
    if calibration:  # lut: quantise for the layers' outputs on these batches (AWQ scales, GPTQ codes)
        lowerings = [dataclasses.replace(p, calibration=tuple(calibration)) if isinstance(p, LowerLUT) else p
                     for p in lowerings]
    tail = [FoldConstants()] if lowerings else []
    return [FoldMergedWeights(), FoldLoRA(), FoldBatchNorm(), FoldConstants(), *lowerings, *tail,
            DeadCodeElimination()]


def build_pipeline(options: CompileOptions, calibration: tuple | None = None) -> PassPipeline:
    passes = list(options.passes) if options.passes is not None else default_passes(options.plan, calibration)
    return PassPipeline(passes, PipelineOptions(dump_dir=options.dump_dir))


class _PipelineIdentity(CustomGraphPass):
    """Puts the pipeline's uuid into inductor's cache key; chains to a user-configured pass in the same slot."""

    def __init__(self, uuid: str, inner=None):
        self._uuid, self._inner = uuid, inner

    def __call__(self, graph: fx.Graph) -> None:
        if self._inner is not None:
            self._inner(graph)

    def uuid(self) -> Any:
        inner = self._inner.uuid() if hasattr(self._inner, "uuid") else None
        return ("torchmerge", self._uuid, inner)


def torchmerge_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options=None, **kw):
    """torch.compile backend entry point (`backend="torchmerge"`, `options={"plan": ..., "inner": ...}`)."""
    from torch._decomp import core_aten_decompositions
    from torch._functorch.aot_autograd import aot_module_simplified

    opts = CompileOptions.from_any(options, **kw)
    pipeline = build_pipeline(opts)

    def fw_compiler(fw_gm: fx.GraphModule, fw_inputs: list):
        context = torch._guards.TracingContext.try_get()
        meta = context.fw_metadata if context is not None else None
        real = list((context.params_flat or []) if context is not None else []) + list(example_inputs)
        with unset_fake_temporarily():  # constants are real tensors; folding computes with them
            keep = _freeze_params(fw_gm, real, meta) if meta is not None and len(real) == len(fw_inputs) else None
            if keep is None:
                warnings.warn("torchmerge: training graph or unknown inputs; parameters stay inputs, so weight "
                              "folding and weight lowering are skipped", stacklevel=2)
                keep = list(range(len(fw_inputs)))
            if opts.plan is not None:
                opts.plan.validate(fw_gm)  # a PlanError here names the key; inside a pass it would not
            pipe = pipeline
            if _needs_calibration(opts):  # int8: activation ranges from the user's batches or this call's inputs
                batches = tuple(graph_args(fw_gm, b) for b in opts.calibration) if opts.calibration else \
                    (tuple(int(real[i]) if isinstance(real[i], torch.SymInt) else real[i] for i in keep),)
                pipe = build_pipeline(opts, batches)
            out = pipe(fw_gm).gm
        kept_inputs = [fw_inputs[i] for i in keep]
        compiled = _compile_inner(out, kept_inputs, opts.inner, pipe.uuid())

        def run(args: list):
            new_args = [args[i] for i in keep]
            args.clear()
            return compiled(new_args)

        run._boxed_call = True
        return run

    return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler,
                                 decompositions=core_aten_decompositions())


def _needs_calibration(opts: CompileOptions) -> bool:
    kinds = {p.kind for p in opts.plan.entries.values()} if opts.plan is not None else set()
    # int8 needs ranges (default: this call's inputs); lut calibrates only on explicit batches (a first call's
    # few rows would overfit GPTQ; without calibration it rounds weights alone)
    return opts.passes is None and ("int8" in kinds or ("lut" in kinds and bool(opts.calibration)))


def _freeze_params(fw_gm: fx.GraphModule, real: list, meta) -> list[int] | None:
    """Replace static (parameter/buffer) inputs that are neither mutated nor aliased by get_attr constants.

    Returns the indices of the inputs the graph still takes, or None when this is not an inference graph.
    """
    from torch._functorch._aot_autograd.schemas import MutationType

    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in real):
        return None
    placeholders = fw_gm.graph.find_nodes(op="placeholder")
    aliased = {o.base_idx for o in meta.output_info if o.base_idx is not None}
    mutated = {i for i, m in enumerate(meta.input_info)
               if m.mutation_type in (MutationType.MUTATED_IN_GRAPH, MutationType.MUTATED_OUT_GRAPH)}
    keep = []
    for i, (node, value) in enumerate(zip(placeholders, real)):
        frozen = i in meta.static_input_indices and i not in aliased | mutated and isinstance(value, torch.Tensor)
        if not frozen:
            keep.append(i)
            continue
        attr = f"_tm_param_{i}"
        fw_gm.register_buffer(attr, value.detach(), persistent=False)
        with fw_gm.graph.inserting_before(node):
            const = fw_gm.graph.get_attr(attr)
        const.meta.update(node.meta)
        node.replace_all_uses_with(const)
        fw_gm.graph.erase_node(node)
    fw_gm.recompile()
    return keep


def _compile_inner(gm: fx.GraphModule, inputs: list, inner: str, uuid: str):
    if inner == "eager":
        return lambda args: gm(*args)
    from torch._guards import detect_fake_mode
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = detect_fake_mode(inputs)
    with mock.patch.object(fake_mode, "allow_non_fake_inputs", True), fake_mode:
        lowered = make_fx(gm, decomposition_table=select_decomp_table())(*inputs)
    identity = _PipelineIdentity(uuid, inductor_config.post_grad_custom_post_pass)
    with inductor_config.patch(post_grad_custom_post_pass=identity), \
            mock.patch.object(fake_mode, "allow_non_fake_inputs", True):
        return compile_fx_inner(lowered, inputs, is_inference=True)
