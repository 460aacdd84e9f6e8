"""`torchmerge merge`: exit codes, dry run, progress output, determinism, options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchmerge import __version__
from torchmerge.cli import main
from torchmerge.merge import registry

from ._checkpoints import merge_methods, run_cli, tiny_model, write_yaml  # noqa: F401


@pytest.fixture
def cfg(tmp_path):
    a, b = tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2)
    return write_yaml(tmp_path / "merge.yaml", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 3.0}}]})


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_subprocess_error_exit_code_and_one_line(tmp_path, cfg):
    """As a user sees it: exit status 2, one line on stderr, no traceback, nothing written."""
    bad = write_yaml(tmp_path / "bad.yaml", {"merge_method": "linear", "models": [{"model": str(tmp_path / "gone")}]})
    proc = run_cli("merge", bad, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"torchmerge: error: {tmp_path / 'gone'}: no such file or directory "
                     "(models are local paths; torchmerge never downloads)"]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_prints_summary_and_progress(tmp_path, cfg, capsys):
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 0
    cap = capsys.readouterr()
    assert "merging (linear)" in cap.err and "100%" in cap.err  # the progress bar, on stderr
    assert "method: linear" in cap.out and f"into {tmp_path / 'out'}" in cap.out


def test_quiet_prints_no_progress_bar(tmp_path, cfg, capsys):
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["merge", str(cfg), "--dry-run", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, cfg, capsys):
    before = sorted(os.listdir(tmp_path))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "method: linear" in cap.out
    assert f"input: {tmp_path / 'a'}  (21 tensors)" in cap.out and f"input: {tmp_path / 'b'}" in cap.out
    assert "output: 21 tensors (21 merged, 0 copied)" in cap.out
    assert "nothing written" in cap.out
    assert "checking" in cap.err  # every input is read and checked, with a progress bar
    assert sorted(os.listdir(tmp_path)) == before


def test_same_seed_same_bytes(tmp_path, capsys):
    a, b = tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2)
    base = tiny_model(tmp_path / "base", seed=0)
    random_method = next((m for m in ("dare_linear", "dare_ties", "della") if m in registry.names()), None)
    if random_method:
        data = {"merge_method": random_method, "base_model": str(base), "parameters": {"density": 0.5, "weight": 1.0},
                "models": [{"model": str(a)}, {"model": str(b)}]}
    else:
        data = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                                                     {"model": str(b), "parameters": {"weight": 0.7}}]}
    cfg = write_yaml(tmp_path / "m.yaml", data)
    for name, seed in (("o1", "5"), ("o2", "5"), ("o3", "6")):
        assert main(["merge", str(cfg), str(tmp_path / name), "--seed", seed, "--quiet", "--shard-size", "3KB"]) == 0
    first = files_of(tmp_path / "o1")
    assert len(first) > 4 and first == files_of(tmp_path / "o2")
    assert json.loads(first["merge_manifest.json"])["seed"] == 5
    third = files_of(tmp_path / "o3")
    assert json.loads(third["merge_manifest.json"])["seed"] == 6
    if random_method:  # a different seed draws different masks
        assert any(third[k] != first[k] for k in first if k.endswith(".safetensors"))


def test_out_dtype_option(tmp_path, cfg, capsys):
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--out-dtype", "bfloat16", "--quiet"]) == 0
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("argv,fragments", [
    (["--shard-size", "lots"], ("--shard-size", "'lots'", "valid:", "5GB")),
    (["--shard-size", "0"], ("--shard-size", "valid:")),
    (["--dtype", "int8"], ("dtype", "'int8'", "valid:")),
])
def test_bad_options(tmp_path, cfg, capsys, argv, fragments):
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    for frag in fragments:
        assert frag in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_dir_required_without_dry_run(cfg, capsys):
    assert main(["merge", str(cfg), "--quiet"]) == 2
    assert "OUT_DIR is required" in capsys.readouterr().err


def test_force_replaces_existing(tmp_path, cfg, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 0
    (out / "stale.txt").write_text("x")
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert main(["merge", str(cfg), str(out), "--quiet", "--force"]) == 0
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "merge.yaml", "out"]


def test_version_and_methods(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "weight[per model]" in out
