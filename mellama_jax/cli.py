"""`mellama-jax`: one command, thin subcommands that parse arguments and call the rooms that do the work."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from mellama_jax.info import describe

    print(describe(args.config, args.overrides, args.model))
    return 0


def _demo(args) -> int:
    from mellama_jax.demo import run_demo

    run_demo(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mellama-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="JAX backend and devices; parameters and per-device memory of a model "
                                       "(computed from abstract shapes, nothing allocated)")
    info.add_argument("--model", help="model preset name or YAML path (overrides the config's model)")
    info.add_argument("--config", help="run config YAML")
    info.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. mesh.ici.tensor=8")
    info.set_defaults(func=_info)

    demo = sub.add_parser("demo", help="a small end-to-end run on the embedded medical-text sample")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mellama_jax.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
