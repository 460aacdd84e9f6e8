"""The `torchmerge` command: one subcommand per capability, each a few lines over the Python API.

Errors meant for people (bad config, bad input files) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .merge.base import MergeError


def _merge(args: argparse.Namespace) -> int:
    from .merge.engine import MergeOptions, describe, dry_run, execute, prepare

    opts = MergeOptions(dtype=args.dtype, out_dtype=args.out_dtype, seed=args.seed, shard_size=args.shard_size,
                        force=args.force, quiet=args.quiet, allow_pickle=args.allow_pickle)
    if args.dry_run:
        print(dry_run(args.config, opts))
        print("dry run: all inputs checked, nothing written")
        return 0
    if args.out_dir is None:
        raise MergeError("OUT_DIR is required unless --dry-run is given")
    plan = prepare(args.config, opts)
    out = execute(plan, args.out_dir, opts)
    print(describe(plan))
    print(f"merged {len(plan.jobs)} tensors into {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .merge.demo import write_demo_config, write_family
    from .merge.engine import MergeOptions, describe, execute, prepare

    work = Path(args.workdir)
    dirs = write_family(work / "family", experts=3)
    config = write_demo_config(work, dirs, args.method)
    print(f"wrote a synthetic Llama-style family (base + {len(dirs) - 1} experts) under {work / 'family'}")
    print(f"config: {config}")
    opts = MergeOptions(force=True, quiet=args.quiet)
    plan = prepare(config, opts)
    out = execute(plan, work / "merged", opts)
    print(describe(plan))
    print(f"merged {len(plan.jobs)} tensors into {out} (see {out / 'merge_manifest.json'})")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .merge import registry

    for name in registry.names():
        m = registry.get(name)
        params = ", ".join(f"{p.name}" + ("" if p.scope == "global" else "[per model]") for p in m.param_specs())
        print(f"{name:20s} {m.reference_url}\n{'':20s} params: {params or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="torchmerge", description="Merge experts, lower and emit models.")
    p.add_argument("--version", action="version", version=f"torchmerge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge models described by a mergekit-style YAML config")
    m.add_argument("config", help="mergekit-style YAML config")
    m.add_argument("out_dir", nargs="?", help="output directory (written atomically)")
    m.add_argument("--dtype", help="compute dtype (float32, bfloat16, float16); default float32 or the config's")
    m.add_argument("--out-dtype", help="dtype of the written tensors; default the config's or the inputs'")
    m.add_argument("--seed", type=int, help="seed for random steps (DARE, DELLA); default the config's or 0")
    m.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB (default 5GB)")
    m.add_argument("--force", action="store_true", help="replace an existing OUT_DIR (only once the new one is complete)")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--dry-run", action="store_true", help="check every input and print the plan; write nothing")
    m.add_argument("--allow-pickle", action="store_true", help="load pickle .bin checkpoints (with weights_only=True)")
    m.set_defaults(func=_merge)

    d = sub.add_parser("demo", help="generate a small synthetic expert family and merge it (no downloads)")
    d.add_argument("--workdir", default="torchmerge-demo", help="folder for the family and the merged model")
    d.add_argument("--method", default="ties", help="merge method to demonstrate (default ties)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    ls = sub.add_parser("methods", help="list merge methods, their papers and parameters")
    ls.set_defaults(func=_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MergeError as e:
        print(f"torchmerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchmerge: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
