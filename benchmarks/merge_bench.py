"""torchmerge vs mergekit 0.1.5 on a synthetic ~0.5B Llama-style family (prints figures, never asserts).

    python benchmarks/merge_bench.py                 # base + 3 experts, ties + task_arithmetic
    python benchmarks/merge_bench.py --experts 8     # also torchmerge peak RSS with 8 vs 2 experts
    python benchmarks/merge_bench.py --small         # tiny model: smoke-test the harness in seconds

Both tools run as fresh subprocesses on the same YAML (compute float32, output bf16). Wall time is
measured around the subprocess; peak RSS is the larger of the child's ru_maxrss (os.wait4) and a
psutil poll of the whole process tree, so both tools are measured the same way (mmap'd pages count).
Targets: ties >= 5x faster, task_arithmetic >= 2x, RSS(torchmerge) <= RSS(mergekit),
RSS(8 experts) <= 1.2 x RSS(2 experts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
FULL = dict(hidden=1024, intermediate=4096, layers=24, heads=16, kv_heads=8, vocab=32000, shard_mb=400)
SMALL = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=512, shard_mb=1)
DELTA_SCALE = 0.1  # expert delta relative to the base's init scale: a "fine-tune" of a few percent


# ---- synthetic family ----------------------------------------------------------------------------
def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, hd = c["hidden"], c["intermediate"], c["hidden"] // c["heads"]
    out = [("model.embed_tokens.weight", (c["vocab"], h))]
    for n in range(c["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (c["kv_heads"] * hd, h)),
                (p + "self_attn.v_proj.weight", (c["kv_heads"] * hd, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab"], h))]


def hf_config(c: dict) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=c["hidden"],
                intermediate_size=c["intermediate"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                num_key_value_heads=c["kv_heads"], vocab_size=c["vocab"], max_position_embeddings=2048,
                rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little"))


class StreamingShards:
    """Safetensors shards whose headers are laid out up front, so tensors are appended one at a time."""

    def __init__(self, folder: Path, shapes: list, shard_bytes: int):
        self.folder, self.shards, size = folder, [[]], 0
        for name, shape in shapes:
            nbytes = 2 * torch.Size(shape).numel()
            if self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, shape, nbytes))
            size += nbytes
        n = len(self.shards)
        self.files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.order = iter([(k, name) for k, s in enumerate(self.shards) for name, _, _ in s])
        self.fh, self.current = None, -1

    def write(self, name: str, t: torch.Tensor) -> None:
        k, expected = next(self.order)
        assert expected == name and t.dtype == torch.bfloat16
        if k != self.current:
            self.close()
            self.current, self.fh, off, header = k, open(self.folder / self.files[k], "wb"), 0, {"__metadata__": {"format": "pt"}}
            for nm, shape, nbytes in self.shards[k]:
                header[nm] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
                off += nbytes
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            self.fh.write(struct.pack("<Q", len(raw)) + raw)
        self.fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        if self.fh:
            self.fh.close()
        self.fh = None

    def finish(self, cfg: dict) -> None:
        self.close()
        weight_map = {nm: self.files[k] for k, s in enumerate(self.shards) for nm, _, _ in s}
        total = sum(b for s in self.shards for _, _, b in s)
        (self.folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (self.folder / "config.json").write_text(json.dumps(cfg, indent=2))


def make_family(root: Path, c: dict, n_experts: int) -> list[Path]:
    """base + experts (base + small random deltas), cached; one tensor of each model in RAM at a time."""
    names = ["base"] + [f"expert{e}" for e in range(n_experts)]
    tag = hashlib.sha256(json.dumps([c, DELTA_SCALE]).encode()).hexdigest()[:8]
    dirs = [root / f"family-{tag}" / n for n in names]
    todo = [d for d in dirs if not (d / ".complete").exists()]
    if not todo:
        return dirs
    t0, shapes = time.perf_counter(), tensor_shapes(c)
    writers = {}
    for d in todo:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        writers[d.name] = StreamingShards(d, shapes, c["shard_mb"] << 20)
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            base = 1 + 0.1 * torch.randn(shape, generator=_gen(name))
        else:
            base = torch.randn(shape, generator=_gen(name)) * 0.02
        if "base" in writers:
            writers["base"].write(name, base.bfloat16())
        for e in (w for w in writers if w != "base"):
            delta = torch.randn(shape, generator=_gen(name, e)).mul_(0.02 * DELTA_SCALE)
            writers[e].write(name, delta.add_(base).bfloat16())
    for d in todo:
        writers[d.name].finish(hf_config(c))
        (d / ".complete").touch()
    print(f"generated {len(todo)} models in {dirs[0].parent} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return dirs


# ---- configs and measurement ---------------------------------------------------------------------
def write_yaml(path: Path, method: str, base: Path, experts: list[Path]) -> Path:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for k, e in enumerate(experts):
        w = (0.3, 0.5, 0.7)[k % 3]
        params = {"ties": f"{{weight: {w}, density: 0.5}}", "task_arithmetic": f"{{weight: {w}}}",
                  "linear": "{weight: 1.0}"}[method]
        lines += [f"  - model: {e}", f"    parameters: {params}"]
    if method == "linear":
        lines[1:2] = []  # linear takes no base model
    lines += ["dtype: float32", "out_dtype: bfloat16", ""]
    path.write_text("\n".join(lines))
    return path


def measure(cmd: list[str], env: dict) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes over the process tree, return code) of a fresh subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, done = [0], threading.Event()

    def poll():
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [ps] + ps.children(recursive=True)))
            except psutil.Error:
                pass
            done.wait(0.02)

    threading.Thread(target=poll, daemon=True).start()
    err = proc.stderr.read()  # drains stderr so the child never blocks; returns at exit
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(f"  FAILED ({proc.returncode}): {' '.join(map(str, cmd))}\n  " + err.decode()[-1500:].replace("\n", "\n  "))
    return wall, max(peak[0], usage.ru_maxrss * 1024), proc.returncode


def run_tool(tool: str, cfg: Path, out: Path, env: dict) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    if tool == "torchmerge":
        cmd = [sys.executable, "-m", "torchmerge.cli", "merge", str(cfg), str(out), "--quiet"]
    else:
        mk = shutil.which("mergekit-yaml") or "mergekit-yaml"
        cmd = [mk, str(cfg), str(out), "--no-write-model-card", "--no-cuda", "--lazy-unpickle", "--quiet",
               "--no-copy-tokenizer"]
    return measure(cmd, env)


def tensor_index(folder: Path) -> dict[str, Path]:
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def max_abs_diff(a: Path, b: Path, sample: int = 12) -> tuple[float, int, str]:
    """Largest |a - b| over a sample of tensors (embed, head, norms, first/last layer), as float32."""
    ia, ib = tensor_index(a), tensor_index(b)
    if set(ia) != set(ib):
        return float("inf"), 0, f"tensor names differ: {sorted(set(ia) ^ set(ib))[:3]}"
    names = sorted(ia)
    picks = [n for n in names if ".layers." not in n] + [n for n in names if ".layers.0." in n]
    picks += names[:: max(1, len(names) // sample)]
    worst, worst_name = 0.0, ""
    for n in dict.fromkeys(picks):
        with safe_open(str(ia[n]), "pt") as ha, safe_open(str(ib[n]), "pt") as hb:
            ta, tb = ha.get_tensor(n), hb.get_tensor(n)
        if ta.dtype != tb.dtype:
            return float("inf"), 0, f"{n}: dtype {ta.dtype} vs {tb.dtype}"
        d = (ta.float() - tb.float()).abs().max().item() if ta.numel() else 0.0
        if d >= worst:
            worst, worst_name = d, n
    return worst, len(dict.fromkeys(picks)), worst_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--experts", type=int, default=3, help="family size; torchmerge RSS is compared at this vs 2 experts")
    ap.add_argument("--compare-experts", type=int, default=3, help="experts in the torchmerge-vs-mergekit runs")
    ap.add_argument("--methods", default="ties,task_arithmetic", help="comma list of ties, task_arithmetic, linear")
    ap.add_argument("--scaling-method", default="ties", help="method of the 2-vs-N-experts RSS runs (torchmerge only)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the median is reported")
    ap.add_argument("--small", action="store_true", help="tiny model, to smoke-test the harness")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs in WORKDIR/out")
    a = ap.parse_args()
    c = SMALL if a.small else FULL
    work = a.workdir.resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    n_params = sum(torch.Size(s).numel() for _, s in tensor_shapes(c))
    dirs = make_family(work, c, max(a.experts, a.compare_experts, 2))
    base, experts = dirs[0], dirs[1:]
    print(f"model: {n_params / 1e9:.3f}B params, bf16, {len(list(base.glob('*.safetensors')))} shards; "
          f"torch {torch.__version__}, {os.cpu_count()} cpus, repeat {a.repeat}", flush=True)
    cfgdir, outdir = work / "configs", work / "out"
    cfgdir.mkdir(parents=True, exist_ok=True)
    rows, diffs = [], []
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        cfg = write_yaml(cfgdir / f"{method}-{a.compare_experts}.yml", method, base, experts[: a.compare_experts])
        res = {"torchmerge": [], "mergekit": []}
        for r in range(a.repeat):  # alternate tools so drift in machine load hits both alike
            for tool in res:
                wall, rss, rc = run_tool(tool, cfg, outdir / f"{method}-{tool}", env)
                res[tool].append((wall, rss) if rc == 0 else (float("nan"), float("nan")))
                print(f"  {method:16s} {tool:10s} run {r + 1}: {wall:7.1f} s  {rss / 2**30:6.2f} GiB", flush=True)
        med = {t: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for t, v in res.items()}
        rows.append((method, med))
        if all((outdir / f"{method}-{t}").exists() for t in res):
            diffs.append((method, *max_abs_diff(outdir / f"{method}-torchmerge", outdir / f"{method}-mergekit")))
            print(f"  {method:16s} max |torchmerge - mergekit| = {diffs[-1][1]:.3g}", flush=True)
    scaling = []
    if a.experts > 2:
        for n in (2, a.experts):
            cfg = write_yaml(cfgdir / f"{a.scaling_method}-{n}.yml", a.scaling_method, base, experts[:n])
            runs = [run_tool("torchmerge", cfg, outdir / f"scale-{n}", env) for _ in range(a.repeat)]
            ok = [(w, m) for w, m, rc in runs if rc == 0] or [(float("nan"), float("nan"))]
            scaling.append((n, statistics.median(w for w, _ in ok), statistics.median(m for _, m in ok)))
            shutil.rmtree(outdir / f"scale-{n}", ignore_errors=True)
    if not a.keep:
        shutil.rmtree(outdir, ignore_errors=True)

    gib = 2**30
    print(f"\n=== torchmerge vs mergekit 0.1.5: base + {a.compare_experts} experts, {n_params / 1e9:.2f}B params, "
          f"median of {a.repeat} ===")
    if not rows:
        print("(no comparison runs)")
    print(f"{'method':16s} {'tm time':>9s} {'mk time':>9s} {'speed-up':>9s} {'tm RSS':>9s} {'mk RSS':>9s} {'RSS tm/mk':>9s}  target")
    targets = {"ties": 5.0, "task_arithmetic": 2.0}
    for method, med in rows:
        (tw, tr), (mw, mr) = med["torchmerge"], med["mergekit"]
        goal = f">={targets[method]:.0f}x, RSS<=1" if method in targets else "-"
        print(f"{method:16s} {tw:8.1f}s {mw:8.1f}s {mw / tw:8.2f}x {tr / gib:6.2f}GiB {mr / gib:6.2f}GiB "
              f"{(tr / mr if mr else float('nan')):9.2f}  {goal}")
    for method, worst, count, where in diffs:
        print(f"agreement {method:16s} max |torchmerge - mergekit| over {count} tensors: {worst:.3g}  (worst: {where})")
    if len(scaling) == 2:
        (n2, w2, r2), (nn, wn, rn) = scaling
        print(f"torchmerge {a.scaling_method} peak RSS: {n2} experts {r2 / gib:.2f} GiB ({w2:.1f} s), {nn} experts {rn / gib:.2f} GiB "
              f"({wn:.1f} s); ratio {rn / r2:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
