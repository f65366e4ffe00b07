"""`mellama-jax`: one command, thin subcommands that parse arguments and call the rooms that do the work."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from mellama_jax import distributed
from mellama_jax.compile_cache import enable as enable_compile_cache
from mellama_jax.config import ConfigError
from mellama_jax.data.corpus import BadRecord
from mellama_jax.options import add_options, from_args

# name -> (help, "module:function" under mellama_jax.commands) or (help, {subcommand: ...}) for a group. A
# command's module is imported only when that command runs: together they import torch, transformers and every
# room, which would make each command's start and `--help` wait for all of them.
COMMANDS = {
    "info": (
        "JAX backend and devices; parameters and per-device memory of a model (computed from abstract shapes, "
        "nothing allocated)",
        "run:info",
    ),
    "train": ("pretrain, lora or sft, as the config's train.mode says", "run:train"),
    "plot": ("PNG loss and throughput curves of a run directory", "run:plot"),
    "demo": ("a small end-to-end run on the embedded medical-text sample", "run:demo"),
    "plan": (
        "compile the train step ahead of time on simulated devices (or a TPU topology): memory per device for "
        "each layout (nothing allocated)",
        "plan:plan",
    ),
    "generate": ("batched decoding with a KV cache from a parameter checkpoint", "evaluate:generate"),
    "eval": (
        "a benchmark task with the authors' prompts and scoring (see --task); `eval score` re-scores a "
        "predictions.jsonl without a model",
        "evaluate:evaluation",
    ),
    "eval-score": ("`eval score`: re-score an eval run's predictions.jsonl, no model", "evaluate:score"),
    "convert": (
        "Hugging Face <-> JAX checkpoints, PEFT adapters, verification",
        {
            "hf-to-jax": ("HF LLaMA directory (safetensors) -> parameter checkpoint", "convert:hf_to_jax"),
            "jax-to-hf": ("parameter checkpoint -> HF directory, or PEFT adapters", "convert:jax_to_hf"),
            "verify": (
                "does transformers compute what our parameters do? Per layer, on sample prompts; names the first "
                "layer that diverges",
                "convert:check",
            ),
        },
    ),
    "prepare": (
        "tokenise corpora or instruction data into ArrayRecord shards",
        {
            "pretrain": (
                "pretraining corpora (The Pile, MIMIC CSV, MIMIC-CXR, JSONL, Parquet, datasets folders) -> "
                "token shards",
                "data:pretrain",
            ),
            "merge": ("write the manifest of a prepare split over hosts (--num-shards)", "data:merge_shards"),
            "instruct": (
                "Alpaca (medalpaca) / Dolly / ShareGPT / prompt-response records -> examples",
                "data:instruct",
            ),
            "overlap": (
                "benchmark test examples sharing a 13-word window with prepared pretraining data "
                "(contamination); optionally a copy without them",
                "data:overlap",
            ),
        },
    ),
    "bench": (
        "benchmarks with JSON output",
        {
            "tokenize": (
                "`prepare pretrain` (plain and compressed inputs, 1..N processes) vs a single-process "
                "SentencePiece loop",
                "bench:tokenize",
            ),
            "mesh": ("train-step throughput, MFU and memory per mesh layout", "bench:mesh"),
            "pair": ("variants of one train step, timed in interleaved rounds (paired)", "bench:pair"),
            "trace": ("device time per step by kernel category, from `bench mesh --profile`", "bench:trace"),
            "attention": ("attention implementations: forward + backward time and error", "bench:attention"),
            "baseline": ("our step vs transformers+torch (and PEFT) on the same batch", "bench:baseline"),
            "convert": ("hf-to-jax and jax-to-hf on a 70B-width checkpoint: RSS, GB/s", "bench:convert"),
            "memory": ("planner (XLA memory analysis) vs measured memory, simulated CPU devices", "bench:memory"),
            "decode": ("KV-cache decoding tokens/s beside transformers' generate", "bench:decode"),
            "load": ("peak resident memory of `generate` on a bf16 checkpoint vs its size", "bench:load"),
        },
    ),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the option and the problem) and exit code 2, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _handler(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(f"mellama_jax.commands.{module}"), name)


def _add_commands(parser, table: dict, chosen: list[str] | None, dest: str) -> None:
    """Subparsers for `table`; options only for the chosen path (every command's when `chosen` is None)."""
    sub = parser.add_subparsers(dest=dest, required=True)
    for name, (help, target) in table.items():
        on_path = chosen is None or (chosen[:1] == [name])
        if isinstance(target, dict):
            group = sub.add_parser(name, help=help)
            _add_commands(group, target, None if chosen is None else chosen[1:] if on_path else [], "subcommand")
            continue
        handler = _handler(target) if on_path else None
        command = sub.add_parser(name, help=help, **(handler.parser if handler else {}))
        if handler:
            add_options(command, handler.request)
            command.set_defaults(handler=handler)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `argv` only the options of the command it names."""
    parser = _Parser(prog="mellama-jax", description=__doc__)
    _add_commands(parser, COMMANDS, None if argv is None else _chosen(argv), "command")
    return parser


def _chosen(argv: list[str]) -> list[str]:
    """The command path `argv` starts with, e.g. ["bench", "mesh"]."""
    path, table = [], COMMANDS
    for word in argv:
        if not isinstance(table, dict) or word not in table:
            break
        path.append(word)
        table = table[word][1]
    return path


def main(argv: list[str] | None = None) -> int:
    """Usage and input errors end as one line on stderr and exit code 2; anything else is a bug, reported by a
    one-line summary and then its traceback (exit code 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "score"]:  # its own parser: `eval`'s options stay as they were
        argv = ["eval-score", *argv[2:]]
    args = build_parser(argv).parse_args(argv)  # argparse: one line and exit code 2 for bad options
    enable_compile_cache(args.command)  # before JAX compiles anything
    code, why = _run(args)
    distributed.leave(code, why)  # this job's other processes, if any, stop watching this one (or stop, if it failed)
    return code


def _run(args) -> tuple[int, str]:
    """(exit code, the error line if any)."""
    try:
        return args.handler(from_args(args.handler.request, args)), ""
    except (ConfigError, FileNotFoundError, NotADirectoryError, BadRecord, ValueError) as e:
        line = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print("error: " + line, file=sys.stderr)
        return 2, line
    except ModuleNotFoundError as e:
        extra = OPTIONAL_MODULES.get((e.name or "").split(".")[0])
        if extra is None:
            return _internal_error(e)
        line = f"{e.name} is not installed; this command needs the {extra} extra: pip install 'mellama-jax[{extra}]'"
        print("error: " + line, file=sys.stderr)
        return 2, line
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130, "interrupted"
    except BrokenPipeError:  # the reader went away (`... | head`): nothing left to say, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141, ""
    except Exception as e:
        return _internal_error(e)


def _internal_error(e: Exception) -> tuple[int, str]:
    print(f"error: internal error, please report it: {type(e).__name__}: {e}", file=sys.stderr)
    traceback.print_exc()
    return 1, f"internal error: {type(e).__name__}"


# Modules that come with an extra of pyproject.toml, not with a plain install: a command that needs one says which.
OPTIONAL_MODULES = {
    **dict.fromkeys(("torch", "transformers", "peft", "datasets", "bert_score", "bs4", "spacy"), "interop"),
    "gcsfs": "gcs",
}


if __name__ == "__main__":
    sys.exit(main())
