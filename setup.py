"""Build hook: runs CMake (CMakeLists.txt) and places the kernels at torchmerge/_C.so.

Metadata lives in pyproject.toml. Build without isolation so the installed torch==2.13.0 is used:
    pip install --no-build-isolation -e ".[test]"
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _replace_atomically(src: Path, dst: Path) -> None:
    """Copy then rename: a process that has the old library mapped keeps a valid file (overwriting it
    in place crashed running processes)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])  # sources are globbed by CMakeLists.txt


class CMakeBuild(build_ext):
    def get_ext_filename(self, ext_name: str) -> str:
        # A plain `_C.so` (not `_C.cpython-311-...so`): torchmerge.ops._loader loads this exact name.
        return os.path.join(*ext_name.split(".")[:-1], ext_name.split(".")[-1] + ".so")

    def build_extension(self, ext: Extension) -> None:
        import torch.utils

        # A fixed build folder in the checkout (ignored by git) keeps rebuilds incremental; editable
        # installs would otherwise compile every kernel from scratch in a fresh temporary folder.
        build_dir = ROOT / "build" / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = str(max(1, min(4, os.cpu_count() or 1)))  # few files; more jobs only cost memory
        subprocess.run(
            [
                "cmake", "-S", str(ROOT), "-B", str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-DTORCHMERGE_OUTPUT_DIR={build_dir / 'out'}",
            ],
            check=True,
        )
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace_atomically(build_dir / "out" / "_C.so", target)
        if not self.inplace:  # editable installs import from the source tree: keep a copy there too
            in_tree = ROOT / self.get_ext_filename(ext.name)
            if in_tree.resolve() != target.resolve() and getattr(self, "editable_mode", False):
                _replace_atomically(target, in_tree)


setup(ext_modules=[CMakeExtension("torchmerge._C")], cmdclass={"build_ext": CMakeBuild})
