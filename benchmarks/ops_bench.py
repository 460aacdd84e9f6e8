"""Benchmarks of torchmerge native ops against peers measured in the same run. Prints; asserts nothing.

    python benchmarks/ops_bench.py                 # every section
    python benchmarks/ops_bench.py --section int8  # one section (repeatable flag)

Adding a section: write ``def <name>_section(cfg: BenchConfig) -> list[Row]`` and append it to SECTIONS.
Times are medians over ``cfg.repeats`` calls after ``cfg.warmup`` calls; ratios are peer time / op time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import torchmerge.ops as ops
from torchmerge.ops import intlinear, lmul, lut, quant


@dataclass(frozen=True)
class BenchConfig:
    repeats: int = 15
    warmup: int = 2


@dataclass(frozen=True)
class Row:
    section: str
    name: str
    seconds: float  # median
    peer: str = ""  # name of the row this one is compared with
    ratio: float | None = None  # peer seconds / these seconds (> 1: faster than the peer)
    note: str = ""


def median_seconds(fns: dict[str, Callable[[], object]], cfg: BenchConfig,
                   before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median wall time of each function, timed round-robin so peers see the same machine load.
    `before` (untimed) runs ahead of every timed call, e.g. to evict the caches."""
    for fn in fns.values():
        for _ in range(cfg.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(cfg.repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def warm_median_seconds(fns: dict[str, Callable[[], object]], cfg: BenchConfig) -> dict[str, float]:
    """Median wall time of each function called back to back, so its operands stay in cache where they fit."""
    out = {}
    for name, fn in fns.items():
        out.update(median_seconds({name: fn}, cfg))
    return out


_EVICT = None


def evict_caches() -> None:
    """Stream 64 MiB through the caches (twice the L3 of the machines we measure on)."""
    global _EVICT
    if _EVICT is None:
        _EVICT = torch.ones(16 << 20)
    _EVICT.add_(1.0)


def with_int8_gemm(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        previous = intlinear.set_int8_gemm(backend)
        try:
            return fn()
        finally:
            intlinear.set_int8_gemm(previous)
    return run


def print_rows(rows: list[Row]) -> None:
    print(f"{'section':<8} {'case':<50} {'median ms':>10} {'ratio':>8}  vs / note")
    for r in rows:
        ratio = f"{r.ratio:7.2f}x" if r.ratio is not None else ""
        print(f"{r.section:<8} {r.name:<50} {r.seconds * 1e3:10.3f} {ratio:>8}  {r.peer}{'; ' if r.peer and r.note else ''}{r.note}")


def _gb_per_s(nbytes: int, seconds: float) -> str:
    return f"weights {nbytes / seconds / 1e9:.1f} GB/s"


def int8_section(cfg: BenchConfig) -> list[Row]:
    """int8_linear with bias + per-channel dyadic requantisation vs fp32 F.linear, same shapes and run.

    [auto] is what users get; [onednn] / [native] force the accumulation GEMM (torch._int_mm vs our tiles).
    """
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((256, 4096, 4096), (1, 4096, 4096)):
        xf = torch.randn(m, k, generator=g)
        wf, bf = torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g) * 0.1
        yf = F.linear(xf, wf, bf)
        wq, w_scale = quant.quantize_weight_per_channel(wf)
        x_scale, out_scale = quant.scale_for(float(xf.abs().max())), quant.scale_for(float(yf.abs().max()))
        bias, mult, shift = intlinear.int8_linear_params(x_scale, w_scale, out_scale, bf)
        xq = quant.quantize_per_tensor(xf, x_scale)
        shape = f"M={m} K={k} N={n}"
        err = float((quant.dequantize(intlinear.int8_linear(xq, wq, bias, mult, shift), out_scale) - yf).norm() / yf.norm())
        int8 = lambda: intlinear.int8_linear(xq, wq, bias, mult, shift, torch.int8)  # noqa: E731
        fns = {"fp32": lambda: F.linear(xf, wf, bf), "auto": int8}
        if ops.native_available():
            fns |= {"onednn": with_int8_gemm("onednn", int8), "native": with_int8_gemm("native", int8)}
        fns["int_mm"] = lambda: torch._int_mm(xq, wq.t())
        t = median_seconds(fns, cfg)
        rows.append(Row("int8", f"F.linear fp32 {shape}", t["fp32"], note=_gb_per_s(4 * n * k, t["fp32"])))
        for backend in [b for b in ("auto", "onednn", "native") if b in t]:
            label = backend if ops.native_available() else "reference, no _C.so"
            note = _gb_per_s(n * k, t[backend]) + (f"; rel. error vs fp32 {err:.2%}" if backend == "auto" else "")
            rows.append(Row("int8", f"int8_linear+requant [{label}] {shape}", t[backend], "F.linear fp32",
                            t["fp32"] / t[backend], note))
        rows.append(Row("int8", f"torch._int_mm (int32 acc only) {shape}", t["int_mm"], "F.linear fp32",
                        t["fp32"] / t["int_mm"]))
    return rows


def lmul_section(cfg: BenchConfig) -> list[Row]:
    """lmul_matmul (L-Mul products, sequential fp32 sum over k) vs fp32 F.linear at M=256, K=N=1024.

    Target: at least 0.3x F.linear's speed. [zeros] prunes 30 % of b: the masked kernel path.
    """
    g = torch.Generator().manual_seed(0)
    m, k, n = 256, 1024, 1024
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    b_pruned = b * (torch.rand(k, n, generator=g) > 0.3)
    w = b.t().contiguous()
    fns = {
        "fp32": lambda: F.linear(a, w),
        "m23": lambda: lmul.lmul_matmul(a, b, 23),
        "m4": lambda: lmul.lmul_matmul(a, b, 4, 3),
        "zeros": lambda: lmul.lmul_matmul(a, b_pruned, 23),
    }
    t = median_seconds(fns, cfg)
    shape = f"M={m} K={k} N={n}"
    label = "" if ops.native_available() else " [reference, no _C.so]"
    rows = [Row("lmul", f"F.linear fp32 {shape}", t["fp32"])]
    for key, name in (("m23", "m=23 l=4"), ("m4", "m=4 l=3"), ("zeros", "m=23, 30% zeros in b")):
        rows.append(Row("lmul", f"lmul_matmul {name}{label}", t[key], "F.linear fp32", t["fp32"] / t[key]))
    return rows


def lut_section(cfg: BenchConfig) -> list[Row]:
    """T-MAC lut_linear (group 32, symmetric, fp16 scales) vs torch._weight_int4pack_mm_for_cpu
    (group 32, bf16 activations) and fp32 F.linear, same shapes and run.

    Targets at M=1: 4-bit >= 1.5x and 2-bit >= 2.5x int4pack, both >= 4x F.linear. [int8 tab] quantises the
    tables (T-MAC's fast mode); [fp32 tab] is exact up to summation order. GB/s counts packed weights + scales.
    Two cache conditions, the same for every variant: cold (64 MiB streamed through the caches before each
    call, as a decode step finds a layer's weights) and warm (each variant called back to back, its weights
    stay in L3 where they fit). Each variant reads its own copy of the weights.
    """
    rows = []
    g = torch.Generator().manual_seed(0)
    for k, n in ((4096, 4096), (14336, 4096)):
        w = torch.randn(n, k, generator=g) * 0.02
        int4 = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g), 1)
        scales_zeros = (torch.rand(k // 32, n, 2, generator=g) * 0.01).to(torch.bfloat16)
        packed = {b: lut.pack_lut_weights(w, b, 32, symmetric=True, scale_dtype=torch.float16) for b in (4, 2)}
        for m in (1, 32):
            x = torch.randn(m, k, generator=g)
            xb = x.to(torch.bfloat16)
            fns = {
                "fp32": lambda: F.linear(x, w),
                "int4pack": lambda: torch._weight_int4pack_mm_for_cpu(xb, int4, 32, scales_zeros),
            }
            for b, p in packed.items():  # yardstick: a plain sum over as many bytes as the b-bit kernel reads
                nbytes = p.qweight.numel() + p.scales.numel() * p.scales.element_size()
                fns[f"read{b}"] = lambda t=torch.ones(nbytes // 4): t.sum()
            for b, p in packed.items():
                for tab in ("int8", "fp32"):
                    # each variant reads its own copy of the weights: timed right after the int8-table call,
                    # the fp32-table one would otherwise find the same bytes still in L3 (a flattering artifact)
                    own = lut.LutWeights(*(v.clone() if isinstance(v, torch.Tensor) else v for v in p)) if tab == "fp32" else p
                    fns[f"b{b} {tab}"] = (lambda p=own, b=b, i8=tab == "int8": lut.lut_linear(x, p, b, 32, int8_tables=i8))
            for mode, t in (("cold", median_seconds(fns, cfg, evict_caches)), ("warm", warm_median_seconds(fns, cfg))):
                rows += _lut_rows(t, f"M={m} K={k} N={n} {mode}", n, k, scales_zeros, packed)
    return rows


def _lut_rows(t: dict[str, float], shape: str, n: int, k: int, scales_zeros: torch.Tensor, packed: dict) -> list[Row]:
    rows = [Row("lut", f"F.linear fp32 {shape}", t["fp32"], note=_gb_per_s(4 * n * k, t["fp32"])),
            Row("lut", f"int4pack_mm bf16 g32 {shape}", t["int4pack"], "F.linear fp32", t["fp32"] / t["int4pack"],
                _gb_per_s(n * k // 2 + scales_zeros.numel() * 2, t["int4pack"]))]
    for b, p in packed.items():
        nbytes = p.qweight.numel() + p.scales.numel() * p.scales.element_size()
        rows.append(Row("lut", f"read reference, {b}-bit bytes {shape}", t[f"read{b}"], "int4pack",
                        t["int4pack"] / t[f"read{b}"], "torch sum over as many bytes (memory-bandwidth yardstick); "
                        + _gb_per_s(nbytes, t[f"read{b}"])))
        for tab in ("int8", "fp32"):
            key = f"b{b} {tab}"
            note = f"{t['fp32'] / t[key]:.2f}x F.linear; " + _gb_per_s(nbytes, t[key])
            rows.append(Row("lut", f"lut_linear {b}-bit [{tab} tab] {shape}", t[key], "int4pack", t["int4pack"] / t[key], note))
    return rows


SECTIONS: list[Callable[[BenchConfig], list[Row]]] = [int8_section, lmul_section, lut_section]


def main(argv: list[str] | None = None) -> None:
    names = {fn.__name__.removesuffix("_section"): fn for fn in SECTIONS}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", action="append", choices=sorted(names), help="run only these sections")
    parser.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    parser.add_argument("--warmup", type=int, default=BenchConfig.warmup)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(repeats=args.repeats, warmup=args.warmup)
    isa = ops.set_cpu_isa("auto")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native kernels: {ops.native_available()}, "
          f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, isa setting: {isa}")
    rows = []
    for name in args.section or list(names):
        rows += names[name](cfg)
    print_rows(rows)


if __name__ == "__main__":
    main()
