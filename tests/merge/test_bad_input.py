"""Bad inputs fail before (or instead of) writing: one line naming the file and tensor/option and what
would be valid, CLI exit code 2, no output directory and no temporary directory left behind."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from torchmerge.cli import main
from torchmerge.merge import registry
from torchmerge.merge import writer as writer_mod
from torchmerge.merge.base import MergeError
from torchmerge.merge.engine import run_merge  # run_merge(...): see test_io's API test

from ._checkpoints import llama_config, llama_tensors, merge_methods, tiny_model, write_yaml  # noqa: F401


# ---- helpers ---------------------------------------------------------------------------------
def linear_cfg(tmp: Path, models: list[str], **extra) -> Path:
    data = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models], **extra}
    return write_yaml(tmp / "merge.yaml", data)


def edit_tensors(model_dir: Path, fn) -> None:
    """Rewrite a single-file checkpoint's tensors through `fn(dict) -> None`."""
    f = model_dir / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    f.unlink()
    save_file(t, str(f))


def edit_config(model_dir: Path, **changes) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def cli_fails(capsys, cfg: Path, out: Path, *fragments: str, extra: tuple[str, ...] = (), dry_run: bool = False) -> str:
    """Run `torchmerge merge`; assert exit code 2, one error line holding every fragment, nothing written."""
    parent_before = sorted(os.listdir(out.parent))
    argv = ["merge", str(cfg)] + (["--dry-run"] if dry_run else [str(out)]) + ["--quiet", *extra]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err, f"error is not one line:\n{err}"
    assert err.startswith("torchmerge: error: ")
    for frag in fragments:
        assert frag in err, f"{frag!r} not in {err!r}"
    assert sorted(os.listdir(out.parent)) == parent_before, "something was written next to the output"
    return err


@pytest.fixture
def two(tmp_path):
    """Two tiny compatible llama checkpoints a, b and an empty folder `work` to write into."""
    a = tiny_model(tmp_path / "a", seed=1)
    b = tiny_model(tmp_path / "b", seed=2)
    work = tmp_path / "work"
    work.mkdir()
    return a, b, work / "out"


# ---- incompatible checkpoints ----------------------------------------------------------------
TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("dry_run", [False, True])
def test_mismatched_shapes(two, capsys, dry_run):
    a, b, out = two
    edit_tensors(b, lambda t: t.__setitem__(TENSOR, torch.zeros(4, 8)))
    err = cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, str(b / "model.safetensors"), repr(TENSOR),
                    "[4, 8]", "[16, 8]", dry_run=dry_run)
    assert "shape mismatch" in err


@pytest.mark.parametrize("dry_run", [False, True])
def test_missing_tensor(two, capsys, dry_run):
    a, b, out = two
    edit_tensors(b, lambda t: t.pop(TENSOR))
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, str(b), repr(TENSOR), "missing", str(a), dry_run=dry_run)


def test_extra_tensor(two, capsys):
    a, b, out = two
    edit_tensors(b, lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)))
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, str(b / "model.safetensors"), "'model.extra.weight'", "extra")


def test_different_vocab_size_in_config(tmp_path, capsys):
    a = tiny_model(tmp_path / "a", seed=1)
    b = tiny_model(tmp_path / "b", seed=2, vocab=20)
    (tmp_path / "work").mkdir()
    cli_fails(capsys, linear_cfg(tmp_path, [str(a), str(b)]), tmp_path / "work" / "out", str(b), "vocab_size 20", "16", "tokenizer")


def test_different_vocab_embedding_shapes_without_config(tmp_path, capsys):
    a = tiny_model(tmp_path / "a", seed=1)
    b = tiny_model(tmp_path / "b", seed=2, vocab=20)
    (tmp_path / "work").mkdir()
    # bare safetensors files: no config.json, so the embedding shapes are what disagree
    err = cli_fails(capsys, linear_cfg(tmp_path, [str(a / "model.safetensors"), str(b / "model.safetensors")]),
                    tmp_path / "work" / "out", str(b / "model.safetensors"), "[20, 8]", "[16, 8]", "different vocab sizes")
    assert "'lm_head.weight'" in err or "'model.embed_tokens.weight'" in err


def test_different_architectures(two, capsys):
    a, b, out = two
    edit_config(b, model_type="mistral")
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, str(b), "'mistral'", "'llama'", "architecture")


# ---- config problems -------------------------------------------------------------------------
def test_unknown_method(two, capsys):
    a, b, out = two
    cfg = write_yaml(a.parent / "m.yaml", {"merge_method": "lineer", "models": [{"model": str(a)}, {"model": str(b)}]})
    cli_fails(capsys, cfg, out, "'lineer'", "valid:", "linear")


@pytest.mark.parametrize("where", ["global", "model"])
def test_unknown_parameter(two, capsys, where):
    a, b, out = two
    data = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                                  {"model": str(b), "parameters": {"weight": 1.0}}]}
    if where == "global":
        data["parameters"] = {"wieght": 0.5}
        fragments = ("parameters", "'wieght'")
    else:
        data["models"][1]["parameters"]["densty"] = 0.5
        fragments = (f"models[1] ({b})", "'densty'")
    cli_fails(capsys, write_yaml(a.parent / "m.yaml", data), out, *fragments, "valid:", "weight")


def test_missing_required_parameter(two, capsys):
    a, b, out = two
    cfg = write_yaml(a.parent / "m.yaml", {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]})
    cli_fails(capsys, cfg, out, "'weight'", "required")


def test_parameter_of_wrong_type(two, capsys):
    a, b, out = two
    cfg = write_yaml(a.parent / "m.yaml", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": "heavy"}}, {"model": str(b), "parameters": {"weight": 1.0}}]})
    cli_fails(capsys, cfg, out, f"models[0] ({a})", "'weight'", "must be a number", "'heavy'")


# `_probe` declares density in (0, 1] (per model) and t in [0, 1] (global), like TIES/DARE and SLERP.
OUT_OF_RANGE = {
    "global density": ({"parameters": {"density": 0.0}}, ("parameters", "'density'=0.0", "(0, 1]")),
    "global t negative": ({"parameters": {"t": -0.25}}, ("parameters", "'t'=-0.25", "[0, 1]")),
    "per-model density": ({"models.1": {"density": 1.5}}, ("models[1]", "'density'=1.5", "(0, 1]")),
    "gradient list": ({"models.1": {"density": [0.5, 0.7, 1.2]}}, ("models[1]", "'density'=1.2", "(0, 1]")),
    "filter conditional": ({"parameters": {"density": [{"filter": "mlp", "value": -0.1}, {"value": 0.5}]}},
                           ("parameters", "'density'=-0.1", "(0, 1]")),
    "gradient inside filter": ({"models.1": {"density": [{"filter": "self_attn", "value": [0.2, 0.0]}, {"value": 1}]}},
                               ("models[1]", "'density'=0.0", "(0, 1]")),
    "t gradient": ({"parameters": {"t": [0, 0.5, 2]}}, ("parameters", "'t'=2", "[0, 1]")),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_out_of_range_parameters(two, capsys, case):
    a, b, out = two
    change, fragments = OUT_OF_RANGE[case]
    data = {"merge_method": "_probe", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                                  {"model": str(b), "parameters": {"weight": 1.0}}]}
    if "parameters" in change:
        data["parameters"] = change["parameters"]
    if "models.1" in change:
        data["models"][1]["parameters"].update(change["models.1"])
    cli_fails(capsys, write_yaml(a.parent / "m.yaml", data), out, *fragments, "out of range")


REAL_RANGES = [  # (method, needs base, parameter block, fragment) checked when that method is registered
    ("ties", True, {"density": 1.5, "weight": 1.0}, "'density'"),
    ("dare_ties", True, {"density": 0.0, "weight": 1.0}, "'density'"),
    ("dare_linear", True, {"density": -0.2, "weight": 1.0}, "'density'"),
    ("slerp", True, {"t": -0.5}, "'t'"),
]


@pytest.mark.parametrize("method,needs_base,params,fragment", REAL_RANGES, ids=[r[0] for r in REAL_RANGES])
def test_out_of_range_real_methods(two, capsys, method, needs_base, params, fragment):
    if method not in registry.names():
        pytest.skip(f"{method} is not registered yet")
    a, b, out = two
    data = {"merge_method": method, "base_model": str(a), "parameters": params,
            "models": [{"model": str(a)}, {"model": str(b)}]}
    cli_fails(capsys, write_yaml(a.parent / "m.yaml", data), out, fragment, "out of range", "valid:")


def test_missing_model_path(two, capsys):
    a, b, out = two
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(a.parent / "nowhere")]), out, "nowhere", "no such file or directory")


def test_invalid_yaml_names_line(two, capsys):
    a, b, out = two
    cfg = a.parent / "bad.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n")
    cli_fails(capsys, cfg, out, str(cfg), "line 4", "not valid YAML")


def test_config_not_found(two, capsys):
    a, b, out = two
    cli_fails(capsys, a.parent / "absent.yaml", out, "absent.yaml", "not found")


def test_modules_unsupported(two, capsys):
    a, b, out = two
    cfg = write_yaml(a.parent / "m.yaml", {"merge_method": "linear", "modules": {"text": {"models": [{"model": str(a)}]}}})
    cli_fails(capsys, cfg, out, str(cfg), "'modules'", "not supported", "'models' or 'slices'")


def test_base_plus_missing_adapter(two, capsys):
    a, b, out = two
    ref = f"{a}+{a.parent / 'no_adapter'}"
    cfg = write_yaml(a.parent / "m.yaml", {"merge_method": "linear", "models": [
        {"model": ref, "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]})
    cli_fails(capsys, cfg, out, "no_adapter", "adapter")


# ---- non-finite values -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dry_run", [False, True])
def test_non_finite_input_named(two, capsys, bad, dry_run):
    a, b, out = two
    edit_tensors(b, lambda t: t[TENSOR].__setitem__((0, 0), bad))
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, str(b / "model.safetensors"), repr(TENSOR),
              "NaN or Inf", dry_run=dry_run)


def test_non_finite_input_named_by_api(two):
    a, b, _ = two
    edit_tensors(b, lambda t: t[TENSOR].__setitem__((1, 1), float("nan")))
    with pytest.raises(MergeError, match=r"b/model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        run_merge(linear_cfg(a.parent, [str(a), str(b)]), quiet=True)


def test_non_finite_in_copied_tensor(tmp_path, capsys):
    """A passthrough slice copies tensors without a method; a NaN there is still refused."""
    a = tiny_model(tmp_path / "a", seed=1, num_layers=3)
    edit_tensors(a, lambda t: t["model.layers.1.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan")))
    (tmp_path / "work").mkdir()
    cfg = write_yaml(tmp_path / "m.yaml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]}]})
    cli_fails(capsys, cfg, tmp_path / "work" / "out", str(a / "model.safetensors"), "'model.layers.1.self_attn.q_proj.weight'", "NaN")


# ---- damaged files ---------------------------------------------------------------------------
def _cut(f: Path, keep: int) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


DAMAGE = {
    "truncated data": (lambda f: _cut(f, -100), ("truncated",)),
    "truncated header": (lambda f: _cut(f, 40), ("truncated",)),
    "shorter than 8 bytes": (lambda f: _cut(f, 5), ("truncated", "no header")),
    "garbage bytes": (lambda f: f.write_bytes(os.urandom(4096)), ("corrupted",)),
    "bad json": (lambda f: f.write_bytes((16).to_bytes(8, "little") + b'{"a": [1, 2,,]} ' + b"\0" * 64), ("not valid JSON",)),
    "header not an object": (lambda f: f.write_bytes((8).to_bytes(8, "little") + b"[1, 2]  "), ("not a JSON object",)),
    "bad offsets": (lambda f: f.write_bytes(b"".join([
        (len(h := json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()).to_bytes(8, "little")), h, b"\0" * 16])),
        ("'w'", "offsets disagree")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("dry_run", [False, True])
def test_damaged_safetensors(two, capsys, case, dry_run):
    a, b, out = two
    damage, fragments = DAMAGE[case]
    damage(b / "model.safetensors")
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, str(b / "model.safetensors"), *fragments, dry_run=dry_run)


def test_sharded_index_lists_missing_shard(tmp_path, capsys):
    a = tiny_model(tmp_path / "a", seed=1)
    b = tiny_model(tmp_path / "b", seed=2, shards=3)
    (b / "model-00002-of-00003.safetensors").unlink()
    (tmp_path / "work").mkdir()
    cli_fails(capsys, linear_cfg(tmp_path, [str(a), str(b)]), tmp_path / "work" / "out",
              str(b / "model.safetensors.index.json"), "model-00002-of-00003.safetensors", "does not exist")


def test_sharded_index_not_json(tmp_path, capsys):
    a = tiny_model(tmp_path / "a", seed=1)
    b = tiny_model(tmp_path / "b", seed=2, shards=2)
    (b / "model.safetensors.index.json").write_text("{not json")
    (tmp_path / "work").mkdir()
    cli_fails(capsys, linear_cfg(tmp_path, [str(a), str(b)]), tmp_path / "work" / "out",
              str(b / "model.safetensors.index.json"), "weight_map")


# ---- pickle checkpoints ----------------------------------------------------------------------
def _bin_dir(path: Path, seed: int) -> Path:
    cfg = llama_config()
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(llama_tensors(cfg, seed), path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("form", ["hf dir", "bare file"])
def test_pickle_refused_without_allow(tmp_path, capsys, form):
    a = tiny_model(tmp_path / "a", seed=1)
    b = _bin_dir(tmp_path / "b", seed=2)
    ref = b if form == "hf dir" else b / "pytorch_model.bin"
    (tmp_path / "work").mkdir()
    cli_fails(capsys, linear_cfg(tmp_path, [str(a), str(ref)]), tmp_path / "work" / "out",
              str(b / "pytorch_model.bin"), "pickle", "--allow-pickle", "safetensors")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy format"])
def test_pickle_loaded_when_allowed(tmp_path, capsys, legacy):
    a = tiny_model(tmp_path / "a", seed=1)
    b = _bin_dir(tmp_path / "b", seed=2)
    if legacy:  # pre-1.6 format: not a zip, cannot be memory-mapped, still loads with weights_only=True
        torch.save(torch.load(b / "pytorch_model.bin", weights_only=True), b / "pytorch_model.bin",
                   _use_new_zipfile_serialization=False)
    out = tmp_path / "out"
    assert main(["merge", str(linear_cfg(tmp_path, [str(a), str(b)])), str(out), "--quiet", "--allow-pickle"]) == 0
    merged = load_file(str(out / "model.safetensors"))
    ta, tb = load_file(str(a / "model.safetensors")), torch.load(b / "pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(merged[TENSOR], (ta[TENSOR] + tb[TENSOR]) / 2)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_never_runs(tmp_path, capsys, writer):
    a = tiny_model(tmp_path / "a", seed=1)
    b = tmp_path / "b"
    b.mkdir()
    (b / "config.json").write_text(json.dumps(llama_config()))
    marker = tmp_path / "PWNED"
    payload = {**llama_tensors(llama_config(), 2), "model.norm.weight": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, b / "pytorch_model.bin")
    else:
        with open(b / "pytorch_model.bin", "wb") as fh:
            pickle.dump(payload, fh)
    assert not marker.exists()
    (tmp_path / "work").mkdir()
    cfg = linear_cfg(tmp_path, [str(a), str(b)])
    cli_fails(capsys, cfg, tmp_path / "work" / "out", str(b / "pytorch_model.bin"), "weights_only=True", extra=("--allow-pickle",))
    cli_fails(capsys, cfg, tmp_path / "work" / "out", str(b / "pytorch_model.bin"), extra=("--allow-pickle",), dry_run=True)
    assert not marker.exists(), "unpickling ran code"


# ---- output directory safety -----------------------------------------------------------------
def _old_dir(out: Path) -> Path:
    out.mkdir()
    (out / "keep.txt").write_text("old merge")
    return out


def test_existing_output_refused_without_force(two, capsys):
    a, b, out = two
    _old_dir(out)
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, str(out), "exists", "--force")
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_force_keeps_old_dir_when_new_merge_fails(two, capsys):
    a, b, out = two
    _old_dir(out)
    edit_tensors(b, lambda t: t[TENSOR].__setitem__((0, 0), float("nan")))
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, "NaN", extra=("--force",))
    assert (out / "keep.txt").read_text() == "old merge"


def test_force_replaces_on_success(two, capsys):
    a, b, out = two
    _old_dir(out)
    assert main(["merge", str(linear_cfg(a.parent, [str(a), str(b)])), str(out), "--quiet", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert os.listdir(out.parent) == ["out"]


class _FullDisk:
    """A file whose writes fail with ENOSPC once `budget` bytes have been written."""

    def __init__(self, fh, budget: list[int]):
        self._fh, self._budget = fh, budget

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if self._budget[0] < n:
            raise OSError(errno.ENOSPC)  # as the brief's simulation raises it: no strerror
        self._budget[0] -= n
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.mark.parametrize("force", [False, True])
def test_disk_full_while_writing(two, capsys, monkeypatch, force):
    a, b, out = two
    if force:
        _old_dir(out)
    budget = [3000]
    real_open = open
    monkeypatch.setattr(writer_mod, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), budget), raising=False)
    cli_fails(capsys, linear_cfg(a.parent, [str(a), str(b)]), out, str(out), "No space left on device",
              extra=("--force",) if force else ("--shard-size", "2000"))
    assert budget[0] < 3000, "the simulated disk was never written to"
    if force:
        assert sorted(os.listdir(out)) == ["keep.txt"]


@pytest.mark.parametrize("force", [False, True])
def test_interrupted_mid_merge(two, capsys, monkeypatch, force):
    a, b, out = two
    if force:
        _old_dir(out)
    method = registry.get("linear")
    calls = []
    real_merge = method.merge

    def interrupt(inputs, params):
        calls.append(inputs.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_merge(inputs, params)

    monkeypatch.setattr(method, "merge", interrupt)
    parent_before = sorted(os.listdir(out.parent))
    rc = main(["merge", str(linear_cfg(a.parent, [str(a), str(b)])), str(out), "--quiet", "--shard-size", "2KB"]
              + (["--force"] if force else []))
    assert rc == 130 and len(calls) == 5
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(out.parent)) == parent_before
    if force:
        assert sorted(os.listdir(out)) == ["keep.txt"]
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # the Python API lets the interrupt through, after cleaning up
        run_merge(linear_cfg(a.parent, [str(a), str(b)]), out=out.parent / "api_out", quiet=True)
    assert sorted(os.listdir(out.parent)) == parent_before


def test_dry_run_with_out_dir_writes_nothing(two, capsys):
    a, b, out = two
    assert main(["merge", str(linear_cfg(a.parent, [str(a), str(b)])), str(out), "--dry-run", "--quiet"]) == 0
    assert not out.exists() and os.listdir(out.parent) == []
