"""`mellama-jax`: one command, thin subcommands that parse arguments and call the rooms that do the work."""

from __future__ import annotations

import argparse
import os
import sys


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` within [low, high] ((low, high] with low_open), else a usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
            lower, upper = low if low is not None else "-inf", high if high is not None else "inf"
            bounds = f"{'(' if low_open else '['}{lower}, {upper}]"
            raise argparse.ArgumentTypeError(f"must lie in {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE, NON_NEGATIVE = _number(int, 1), _number(int, 0)


def _size(text: str) -> int:
    """Bytes from '5GB', '500MB', '1.5GiB' or a plain integer."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            upper, scale = upper[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        value = int(float(upper) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MB, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _positive_list(text: str) -> tuple[int, ...]:
    """'1,16' -> (1, 16): comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _threads_list(text: str) -> tuple[int | None, ...]:
    """'auto,1' -> (None, 1): thread counts, auto meaning the command's own default."""
    return tuple(None if t == "auto" else _positive_list(t)[0] for t in text.split(","))


def _request(cls, args, **given):
    """A command's typed request from its parsed options (each option's dest is the field's name), but for the
    fields in `given`, which the command parsed further."""
    import dataclasses

    return cls(**{f.name: given[f.name] if f.name in given else getattr(args, f.name) for f in dataclasses.fields(cls)})


def _layouts(text: str) -> tuple[str, ...]:
    """'fsdp=8;fsdp=4,tensor=2' -> ('fsdp=8', 'fsdp=4,tensor=2'): ";"-separated ici layouts."""
    return tuple(layout for layout in text.split(";") if layout)


def _names(text: str) -> tuple[str, ...]:
    """'full,lora' -> ('full', 'lora')."""
    return tuple(text.split(","))


def _info(args) -> int:
    from mellama_jax.info import describe

    print(describe(args.config, args.overrides, args.model))
    return 0


def _demo(args) -> int:
    from mellama_jax.demo import run_demo

    run_demo(args.out, args.devices)
    return 0


def _name_values(items: list[str], what: str) -> dict[str, list[str]]:
    from mellama_jax.config import ConfigError

    out: dict[str, list[str]] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r} is not of the form NAME=VALUE[,VALUE...]")
        name, values = item.split("=", 1)
        out.setdefault(name, []).extend(v for v in values.split(",") if v)
    return out


def _sources(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--source {item!r} is not of the form NAME=KIND:PATH[?OPTIONS] or NAME=FILE[,FILE]")
        out.setdefault(name, []).append(spec)
    return out


def _prepare_pretrain(args) -> int:
    from mellama_jax.data.prepare import PretrainDataRequest, prepare_pretrain, summarize

    fields = {k: tuple(v) for k, v in _name_values(args.fields, "--fields").items()}
    manifest = prepare_pretrain(_request(PretrainDataRequest, args, sources=_sources(args.sources), fields=fields))
    if manifest is None:
        print(f"shard {args.shard_index} of {args.num_shards} done; the manifest is written when the last one "
              f"finishes (or: mellama-jax prepare merge --out {args.out})")
        return 0
    print(summarize(manifest))
    print(f"wrote {args.out}/manifest.json (skipped records with file:line: {args.out}/<source>/*.done.json)")
    return 0


def _prepare_merge(args) -> int:
    from mellama_jax.data.prepare import Pending, merge, summarize

    try:
        print(summarize(merge(args.out)))
    except Pending as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/manifest.json")
    return 0


def _prepare_overlap(args) -> int:
    from mellama_jax.eval.overlap import OverlapRequest, find_overlap

    report = find_overlap(_request(OverlapRequest, args))
    print(f"{report['documents_scanned']:,} documents scanned in {report['seconds']:.1f} s "
          f"({report['workers']} processes); {report['documents_matched']:,} share a {report['n']}-word window "
          "with a test example")
    for task, t in report["tasks"].items():
        print(f"  {task}: {t['overlapping']:,} of {t['examples']:,} examples overlap ({100 * t['share']:.2f}%); "
              f"{t['too_short']:,} shorter than {report['n']} words")
    print(f"wrote {args.out}/overlap.json" + (f" and {report['filtered']}" if "filtered" in report else ""))
    return 0


def _prepare_instruct(args) -> int:
    import json

    from mellama_jax.data.instruct import InstructDataRequest, prepare_instruct

    manifest = prepare_instruct(_request(InstructDataRequest, args))
    report = manifest["report"]
    print(f"{report['documents']:,} examples -> {manifest['rows']:,} rows of <= {manifest['seq_len']} tokens; "
          f"{manifest['response_tokens']:,} response tokens; {manifest['truncated']:,} truncated; "
          f"{report['skipped_total']:,} skipped {json.dumps(report['skipped'])}")
    for line in report["skipped_examples"][:10]:
        print(f"  skipped {line}")
    print(f"wrote {args.out}/manifest.json")
    return 0


def _bench_tokenize(args) -> int:
    import json

    from mellama_jax.bench.tokenize import TokenizeBenchRequest, bench_tokenize

    print(json.dumps(bench_tokenize(_request(TokenizeBenchRequest, args)), indent=1))
    return 0


def _train(args) -> int:
    from mellama_jax import distributed

    distributed.initialize()  # before anything touches the devices
    from mellama_jax.config import load_config
    from mellama_jax.train.hooks import NoTargets
    from mellama_jax.train.loop import NonFiniteLoss, train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except NonFiniteLoss as e:  # a batch without targets is the data's fault: exit 2, as for other bad input
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, NoTargets) else 3
    return 0 if result["status"] == "finished" or result["status"].startswith("stopped") else 1


def _plot(args) -> int:
    from mellama_jax.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _convert(args) -> int:
    import json

    from mellama_jax.convert import api, verify

    if args.direction == "hf-to-jax":
        print(api.hf_to_jax(_request(api.ImportRequest, args)))
    elif args.direction == "jax-to-hf":
        print(api.jax_to_hf(_request(api.ExportRequest, args)))
    else:
        report = verify.verify(_request(verify.VerifyRequest, args))
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    return 0


def _bench_mesh(args) -> int:
    import json

    import jax

    if args.devices:
        jax.config.update("jax_num_cpu_devices", args.devices)
    from mellama_jax.bench.mesh import MeshBenchRequest, bench_mesh, markdown

    result = bench_mesh(_request(MeshBenchRequest, args))
    print(markdown(result))
    print(json.dumps(result, indent=1))
    return _all_failed(result["layouts"])


def _all_failed(rows: list[dict]) -> int:
    """Exit status 1 when no layout could be built (each row says why), 0 otherwise."""
    if rows and all("error" in r for r in rows):
        print(f"error: every layout failed (first: {rows[0]['error']})", file=sys.stderr)
        return 1
    return 0


def _bench_trace(args) -> int:
    import json

    from mellama_jax.bench.trace import markdown, summarize

    summary = summarize(args.trace, args.steps, args.top)
    print(markdown(summary))
    print(json.dumps(summary, indent=1))
    return 0


def _bench_attention(args) -> int:
    import json

    from mellama_jax.bench.attention import AttentionBenchRequest, bench_attention

    print(json.dumps(bench_attention(_request(AttentionBenchRequest, args)), indent=1))
    return 0


def _bench_pair(args) -> int:
    import json

    from mellama_jax.bench.mesh import PairBenchRequest, bench_pair

    result = bench_pair(_request(PairBenchRequest, args))
    for row in result["rows"]:
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        print(f"{' '.join(row['overrides']) or '(as configured)'}: {row['step_s_median']:.3f} s a step{mfu}, "
              f"{row['speed_vs_first']:.3f}x the first")
    print(json.dumps(result, indent=1))
    return 0


def _bench_baseline(args) -> int:
    import json

    from mellama_jax.bench.mesh import BaselineBenchRequest, bench_baseline

    print(json.dumps(bench_baseline(_request(BaselineBenchRequest, args)), indent=1))
    return 0


def _bench_convert(args) -> int:
    import json

    from mellama_jax.bench.convert import bench_convert

    print(json.dumps(bench_convert(args.layers, args.workdir), indent=1))
    return 0


def _bench_memory(args) -> int:
    import json

    from mellama_jax.bench.memory import MemoryBenchRequest, bench_memory_layouts

    result = bench_memory_layouts(_request(MemoryBenchRequest, args))
    print("| layout | planned GiB (XLA, all devices) | measured GiB (RSS growth) | measured / planned |")
    print("|---|---|---|---|")
    for r in result["layouts"]:
        if "error" in r:
            print(f"| {r['layout']} | error: {r['error'][:80]} | | |")
        else:
            print(f"| {r['layout']} | {r['planned_total_bytes'] / 2**30:.2f} | "
                  f"{r['measured_rss_growth_bytes'] / 2**30:.2f} | {r['ratio_measured_to_planned']:.3f} |")
    print(json.dumps(result, indent=1))
    return 0


def _bench_decode(args) -> int:
    import json

    from mellama_jax.bench.decode import DecodeBenchRequest, bench_decode

    print(json.dumps(bench_decode(_request(DecodeBenchRequest, args)), indent=1))
    return 0


def _bench_load(args) -> int:
    import json

    from mellama_jax.bench.load import LoadBenchRequest, bench_load

    print(json.dumps(bench_load(_request(LoadBenchRequest, args)), indent=1))
    return 0


def _generate(args) -> int:
    from mellama_jax.eval.run import GenerateRequest, complete

    r = _request(GenerateRequest, args)
    for prompt, text in zip(r.prompt, complete(r)):
        print(prompt + text)
    return 0


def _plan(args) -> int:
    from mellama_jax.plan import layouts as plan

    if args.search:
        import json

        from mellama_jax.plan import search

        request = _request(search.SearchRequest, args, config=args.config)
        result = search.search(request)
        if request.calibrate:
            from mellama_jax.bench.calibrate import calibrate

            result["calibration"] = calibrate(result, request.config, search.request_overrides(request),
                                              request.calibrate)
        print(json.dumps(result, indent=1) if args.json else search.markdown(result))
        return 0 if result["fits"] else 1

    run, table = (plan.plan_tpu, plan.markdown_tpu) if args.target == "tpu" else (plan.plan, plan.markdown)
    result = run(_request(plan.PlanRequest, args))
    print(plan.report(result, table))
    return _all_failed(result["layouts"])


def _eval(args) -> int:
    import json

    from mellama_jax.eval.run import EvalRequest, evaluate

    summary = evaluate(_request(EvalRequest, args))
    print(json.dumps(summary, indent=1))
    return 0


def _eval_score(args) -> int:
    import json

    from mellama_jax.eval.rescore import RescoreRequest, rescore

    print(json.dumps(rescore(_request(RescoreRequest, args)), indent=1))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the option and the problem) and exit code 2, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _add_run_commands(sub) -> None:
    """info, train, plot, demo."""
    info = sub.add_parser("info", help="JAX backend and devices; parameters and per-device memory of a model "
                                       "(computed from abstract shapes, nothing allocated)")
    info.add_argument("--model", help="model preset name or YAML path (overrides the config's model)")
    info.add_argument("--config", help="run config YAML")
    info.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. mesh.ici.tensor=8")
    info.set_defaults(func=_info)

    tr = sub.add_parser("train", help="pretrain, lora or sft, as the config's train.mode says")
    tr.add_argument("--config", required=True, help="a recipe YAML, e.g. configs/me-llama-13b-pretrain.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.dir=runs/x train.steps=100")
    tr.set_defaults(func=_train)

    pl = sub.add_parser("plot", help="PNG loss and throughput curves of a run directory")
    pl.add_argument("run_dir")
    pl.set_defaults(func=_plot)

    demo = sub.add_parser("demo", help="a small end-to-end run on the embedded medical-text sample")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--devices", type=POSITIVE, default=8, help="simulated CPU devices")
    demo.set_defaults(func=_demo)


def _add_plan(sub) -> None:
    """plan: the train step compiled ahead of time."""
    pln = sub.add_parser("plan", help="compile the train step ahead of time on simulated devices (or a TPU "
                                      "topology): memory per device for each layout (nothing allocated)")
    pln.add_argument("--config", help="a recipe YAML")
    pln.add_argument("--model", help="model preset (overrides the config's)")
    pln.add_argument("--devices", type=POSITIVE, help="simulated devices, e.g. 160")
    pln.add_argument("--layouts", type=_layouts, default=(),
                     help='";"-separated ici layouts, e.g. "fsdp=8;fsdp=4,tensor=2" (default: the config\'s mesh; '
                          'tpu: fsdp=-1, the whole slice)')
    pln.add_argument("--memory-gib", type=_number(float, 0.0, low_open=True), default=80.0,
                     help="device memory to fit, GiB (default 80)")
    pln.add_argument("--target", choices=("cpu", "tpu"), default="cpu",
                     help="tpu: compile for the chips of --topology with the TPU compiler (needs the tpu extra)")
    pln.add_argument("--topology", help="tpu: CHIP:SHAPE as JAX names TPU topologies, e.g. v5p:4x4x4 (64 chips)")
    pln.add_argument("--slices", type=POSITIVE, default=1,
                     help="tpu: slices of --topology, data parallel across them (dcn)")
    pln.add_argument("--search", action="store_true",
                     help="rank the layouts, accumulations and remat policies that fit (--devices, --gpu)")
    pln.add_argument("--devices-per-host", type=POSITIVE, default=8, help="--search: devices per host (default 8)")
    pln.add_argument("--gpu", choices=("a100", "h100"), default="a100", help="--search: the figures ranked on")
    pln.add_argument("--tokens", type=_number(float, 0.0, low_open=True), default=129e9,
                     help="--search: the training budget in tokens, for days to the end (default 129e9)")
    pln.add_argument("--max-compiles", type=POSITIVE, default=8, help="--search: survivors compiled and ranked")
    pln.add_argument("--remats", type=_names, default="full", help="--search: comma-separated remat policies")
    pln.add_argument("--calibrate", type=_number(int, 0), default=0,
                     help="--search: run the best N that fit on this host's devices and compare (ranked on this "
                          "host's measured figures)")
    pln.add_argument("--json", action="store_true", help="--search: the result as JSON")
    pln.add_argument("overrides", nargs="*")
    pln.set_defaults(func=_plan)


def _add_generate(sub) -> None:
    """generate: decoding with a KV cache."""
    gen = sub.add_parser("generate", help="batched decoding with a KV cache from a parameter checkpoint")
    gen.add_argument("--model", required=True, help="a parameter checkpoint (hf-to-jax output, a run's params/)")
    gen.add_argument("--tokenizer", help="tokenizer.model (default: found beside the checkpoint)")
    gen.add_argument("--prompt", action="append", required=True, help="repeatable: one batch of prompts")
    gen.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    gen.add_argument("--temperature", type=_number(float, 0.0), default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=_number(float, 0.0, 1.0, low_open=True), default=1.0, help="in (0, 1]")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--mesh", help='decode sharded over the devices, e.g. "data=4,tensor=2"')
    gen.add_argument("--adapters", help="a LoRA run's adapters/ directory (--model is then the base)")
    gen.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                     help="parameters and computation (default bfloat16, as LLaMA2 ships; logits in float32)")
    gen.add_argument("--truncate", action="store_true",
                     help="a prompt too long for the model keeps BOS and its last tokens (as `eval` does) instead "
                          "of being refused")
    gen.set_defaults(func=_generate)


def _add_eval(sub) -> None:
    """eval and eval score."""
    ev = sub.add_parser("eval", help="a benchmark task with the authors' prompts and scoring (see --task); "
                                     "`eval score` re-scores a predictions.jsonl without a model",
                        epilog="mellama-jax eval score --task T --predictions predictions.jsonl --out DIR: "
                               "score an earlier run's outputs again (see `eval score --help`)")
    from mellama_jax.eval.tasks import TASKS  # stdlib only: keeps --help fast

    ev.add_argument("--task", required=True, choices=sorted(TASKS))
    ev.add_argument("--data", required=True, help="the dataset's original file or folder (docs/evaluation.md)")
    ev.add_argument("--split", help="PubMedQA: the split's id -> label file (test_ground_truth.json)")
    ev.add_argument("--model", required=True, help="jax: a parameter checkpoint; hf: a Hugging Face directory")
    ev.add_argument("--backend", choices=["jax", "hf"], default="jax")
    ev.add_argument("--prompts", help="the authors' prompt_templates.json (needed for all but i2b2 and bionli)")
    ev.add_argument("--out", required=True)
    ev.add_argument("--limit", type=POSITIVE, help="the first N examples")
    ev.add_argument("--batch-size", type=POSITIVE, default=8)
    ev.add_argument("--max-new-tokens", type=POSITIVE, help="default 256 for every task, as the authors' harness")
    ev.add_argument("--fewshot", type=NON_NEGATIVE, default=0, help="k demonstrations from --fewshot-data (default 0)")
    ev.add_argument("--fewshot-data", help="the training split's file, same format as --data")
    ev.add_argument("--seed", type=int, default=0, help="which few-shot demonstrations are drawn")
    ev.add_argument("--mesh", help='jax: decode sharded over the devices, e.g. "data=4,tensor=2"')
    ev.add_argument("--adapters", help="jax: a LoRA run's adapters/ directory (--model is then the base)")
    ev.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="both backends: parameters and computation (default bfloat16, as LLaMA2 ships)")
    ev.add_argument("--hf-tokenizer", choices=["sentencepiece", "transformers"], default="sentencepiece",
                    help="hf backend: tokenise with tokenizer.model as training did (default) or AutoTokenizer")
    bert_help = ("summaries: the local copy of bert-base-multilingual-cased, the paper's BERTScore model (else "
                 "skipped; another model is reported under its own name)")
    ev.add_argument("--tokenizer", help="jax: tokenizer.model (default: found with the parameters)")
    ev.add_argument("--model-prompt", choices=["none", "mellama"], default="none",
                    help="wrap each whole prompt as the authors' eval.py --model_prompt: none (their default) or "
                         "mellama ('Human: \\n{prompt}\\n\\nAssistant: \\n', for chat models tuned with "
                         "`prepare instruct --template mellama`)")
    ev.add_argument("--overwrite", action="store_true", help="replace an earlier eval output at --out")
    ev.add_argument("--overlap", help="`prepare overlap`'s overlap.json: also score the examples it found no "
                                      "training document overlapping (summary.json: clean)")
    ev.add_argument("--bertscore-model", help=bert_help)
    ev.set_defaults(func=_eval)
    # `eval score ...` is rewritten to `eval-score ...` in main(): `eval`'s own options stay as they were
    evs = sub.add_parser("eval-score", prog="mellama-jax eval score",
                         help="`eval score`: re-score an eval run's predictions.jsonl, no model")
    evs.add_argument("--task", required=True, choices=sorted(TASKS))
    evs.add_argument("--predictions", required=True, help="a predictions.jsonl that `eval` wrote")
    evs.add_argument("--out", required=True, help="folder for the new predictions.jsonl, summary.json, summary.md")
    evs.add_argument("--bertscore-model", help=bert_help)
    evs.set_defaults(func=_eval_score)


def _add_convert(sub) -> None:
    """convert hf-to-jax, jax-to-hf, verify."""
    conv = sub.add_parser("convert", help="Hugging Face <-> JAX checkpoints, PEFT adapters, verification")
    conv_sub = conv.add_subparsers(dest="direction", required=True)
    h2j = conv_sub.add_parser("hf-to-jax", help="HF LLaMA directory (safetensors) -> parameter checkpoint")
    h2j.add_argument("src")
    h2j.add_argument("dst")
    h2j.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="default: keep the checkpoint's dtype (bit-exact round trips)")
    h2j.add_argument("--mesh", help="store pre-sharded for a mesh, e.g. fsdp=8,tensor=2 (default rule table)")
    h2j.add_argument("--overwrite", action="store_true", help="replace an earlier hf-to-jax output at DST")
    j2h = conv_sub.add_parser("jax-to-hf", help="parameter checkpoint -> HF directory, or PEFT adapters")
    j2h.add_argument("src", help="a run's params/, a checkpoint's state/, or hf-to-jax output")
    j2h.add_argument("dst")
    j2h.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    j2h.add_argument("--shard-size", type=_size, default="5GB", help="safetensors shard size, e.g. 5GB, 500MB")
    j2h.add_argument("--overwrite", action="store_true", help="replace an earlier jax-to-hf output at DST")
    j2h.add_argument("--tokenizer", help="tokenizer.model (default: found beside SRC)")
    j2h.add_argument("--model", help="model preset or YAML (default: model.yaml or the run's config.yaml)")
    j2h.add_argument("--adapters", help="a LoRA run's adapters/: write PEFT adapters (or --merge)")
    j2h.add_argument("--merge", action="store_true", help="fold the adapters into a full model")
    ver = conv_sub.add_parser("verify", help="does transformers compute what our parameters do? Per layer, on "
                                             "sample prompts; names the first layer that diverges")
    ver.add_argument("hf_dir", metavar="src", help="HF directory")
    ver.add_argument("params", metavar="dst", help="parameter checkpoint")
    ver.add_argument("--model", help="model preset or YAML (default: found beside the checkpoint)")
    ver.add_argument("--adapters", help="a LoRA run's adapters/ over DST (for a merged export)")
    ver.add_argument("--tolerance", type=_number(float, 0.0, low_open=True),
                     help="relative difference allowed per token and layer (default: "
                          "fp32 rounding's, from the model's width and depth)")
    for p in (h2j, j2h, ver):
        p.set_defaults(func=_convert)


def _add_prepare(sub) -> None:
    """prepare pretrain, merge, instruct."""
    prepare = sub.add_parser("prepare", help="tokenise corpora or instruction data into ArrayRecord shards")
    prep_sub = prepare.add_subparsers(dest="kind", required=True)
    from mellama_jax.data import sources as source_specs  # stdlib only: keeps --help fast

    pre = prep_sub.add_parser("pretrain", help="pretraining corpora (The Pile, MIMIC CSV, MIMIC-CXR, JSONL, "
                                               "Parquet, datasets folders) -> token shards",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="--source syntax (docs/data.md has every corpus of the paper):\n\n"
                                     + source_specs.__doc__.split("\n\n", 1)[1])
    pre.add_argument("--source", dest="sources", metavar="SOURCE", action="append", required=True,
                     help="NAME=KIND:PATH[?OPTIONS] or NAME=FILE[,FILE...], repeatable, e.g. "
                          "biomedical=pile:/data/pile/*.jsonl.zst?subset=PubMed+Central,PubMed+Abstracts")
    pre.add_argument("--fields", action="append", help="NAME=FIELD[,FIELD...] text fields of a source "
                                                       "(joined by newlines; default: text; or ?text= in its spec)")
    pre.add_argument("--tokenizer", required=True, help="tokenizer.model or a directory holding it")
    pre.add_argument("--out", required=True)
    pre.add_argument("--workers", type=POSITIVE, default=None, help="processes, one unit (file) each at a time "
                                                               "(default: all cores; 1 under 16 MB of input)")
    pre.add_argument("--threads", type=POSITIVE, default=None, help="encoding threads per process (default: cores "
                                                               "/ processes)")
    pre.add_argument("--num-shards", type=POSITIVE, default=1, help="hosts sharing the work (by input file)")
    pre.add_argument("--shard-index", type=NON_NEGATIVE, default=0, help="this host's share, 0..num-shards-1")
    pre.add_argument("--overwrite", action="store_true", help="replace an earlier prepare of other sources in "
                                                              "--out (its stale source folders are removed)")
    pre.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    pre.set_defaults(func=_prepare_pretrain)
    mrg = prep_sub.add_parser("merge", help="write the manifest of a prepare split over hosts (--num-shards)")
    mrg.add_argument("--out", required=True, help="the shared --out of every shard")
    mrg.set_defaults(func=_prepare_merge)
    ins = prep_sub.add_parser("instruct", help="Alpaca (medalpaca) / Dolly / ShareGPT / prompt-response records "
                                               "-> examples")
    ins.add_argument("inputs", nargs="+", help=".json, .jsonl(.gz/.zst), .parquet, .arrow, or a datasets folder "
                                               "(save_to_disk output or a folder of those files)")
    ins.add_argument("--tokenizer", required=True)
    ins.add_argument("--out", required=True)
    ins.add_argument("--seq-len", type=POSITIVE, default=4096)
    ins.add_argument("--template", default="llama2_chat",
                     help="llama2_chat, alpaca, mellama (the Me-LLaMA authors' Human:/Assistant: wrapper), "
                          "or a template YAML file")
    ins.add_argument("--format", default="auto", choices=["auto", "alpaca", "dolly", "sharegpt", "prompt_response"])
    ins.add_argument("--truncation", default="truncate", choices=["truncate", "drop"])
    ins.add_argument("--pack", action="store_true", help="pack several examples per row (with segment ids)")
    ins.add_argument("--no-eos-loss", action="store_false", dest="train_on_eos",
                     help="do not train on the EOS after each response")
    ins.add_argument("--strict", action="store_true")
    ins.add_argument("--overwrite", action="store_true", help="replace an earlier `prepare instruct` output")
    ins.set_defaults(func=_prepare_instruct)
    ovl = prep_sub.add_parser("overlap", help="benchmark test examples sharing a 13-word window with prepared "
                                              "pretraining data (contamination); optionally a copy without them")
    ovl.add_argument("--data", required=True, help="a `prepare pretrain` or `prepare instruct` output")
    ovl.add_argument("--task", dest="tasks", action="append", required=True, metavar="TASK=FILE",
                     help="repeatable: a task and the file `eval --task TASK --data FILE` reads")
    ovl.add_argument("--split", dest="splits", action="append", default=[], metavar="TASK=FILE",
                     help="PubMedQA: its test split's id -> label file")
    ovl.add_argument("--prompts", help="the authors' prompt_templates.json (all tasks but i2b2 and bionli)")
    ovl.add_argument("--out", required=True, help="a new folder for overlap.json")
    ovl.add_argument("--n", type=POSITIVE, default=13, help="words per window (default 13, GPT-3's)")
    ovl.add_argument("--workers", type=NON_NEGATIVE, default=0, help="processes scanning shards (0: all cores)")
    ovl.add_argument("--filtered-out", help="also write a copy of --data without the overlapping documents")
    ovl.add_argument("--overwrite", action="store_true", help="replace earlier outputs of this command")
    ovl.set_defaults(func=_prepare_overlap)


def _add_bench_speed(bench_sub) -> None:
    """bench tokenize, mesh, trace, attention: our own speeds."""
    btok = bench_sub.add_parser("tokenize", help="`prepare pretrain` (plain and compressed inputs, 1..N "
                                                 "processes) vs a single-process SentencePiece loop")
    btok.add_argument("--corpus", help="a JSONL/txt/Parquet corpus")
    btok.add_argument("--tokenizer", required=True)
    btok.add_argument("--fields", type=_names, default="text")
    btok.add_argument("--repeat", type=POSITIVE, default=8, help="repeat the corpus to reach a few MB")
    btok.add_argument("--formats", type=_names, default="jsonl,jsonl.gz,jsonl.zst",
                      help="input forms to time (JSONL only)")
    btok.add_argument("--workers", type=_positive_list, default=(1, 2), help="process counts to time")
    btok.add_argument("--threads", type=_threads_list, default=(None,),
                      help="encode threads per process to time (auto: the cores "
                           "shared among the processes; 1: scaling by processes)")
    btok.add_argument("--rounds", type=POSITIVE, default=3, help="interleaved repetitions; the best of each is kept")
    btok.add_argument("--stream-gb", type=float, default=0, help="instead: peak RSS of prepare on a synthetic "
                                                                "Pile-like .jsonl.zst of this many GB")
    btok.add_argument("--workdir", help="where the temporary files go (default: the system's temp folder)")
    btok.set_defaults(func=_bench_tokenize)
    bmesh = bench_sub.add_parser("mesh", help="train-step throughput, MFU and memory per mesh layout")
    bmesh.add_argument("--model", default="bench-60m")
    bmesh.add_argument("--layouts", type=_layouts, default="data=8;fsdp=8;fsdp=4,tensor=2",
                       help='";"-separated ici layouts')
    bmesh.add_argument("--devices", type=NON_NEGATIVE, default=0, help="simulated CPU devices (0: what is there)")
    bmesh.add_argument("--seq", type=POSITIVE, default=256)
    bmesh.add_argument("--batch", type=POSITIVE, default=8)
    bmesh.add_argument("--remat", default="none")
    bmesh.add_argument("--dtype", default="float32")
    bmesh.add_argument("--warmup", type=NON_NEGATIVE, default=2)
    bmesh.add_argument("--steps", type=POSITIVE, default=5)
    bmesh.add_argument("--png", help="bar chart output path")
    bmesh.add_argument("--profile", help="folder for a device trace and the optimized HLO of each layout")
    bmesh.add_argument("overrides", nargs="*",
                       help="more config overrides, e.g. model.num_layers=8 model.attention=cudnn")
    bmesh.set_defaults(func=_bench_mesh)
    bpair = bench_sub.add_parser("pair", help="variants of one train step, timed in interleaved rounds (paired)")
    bpair.add_argument("--variant", dest="variants", action="append", type=lambda text: tuple(text.split()),
                       default=[], help='space-separated config overrides of one variant ("" for the config as it '
                                        'is); give two or more, the first is the reference')
    bpair.add_argument("--model", default="bench-60m")
    bpair.add_argument("--seq", type=POSITIVE, default=256)
    bpair.add_argument("--batch", type=POSITIVE, default=4)
    bpair.add_argument("--rounds", type=POSITIVE, default=10, help="timed steps of each variant, interleaved")
    bpair.add_argument("--warmup", type=NON_NEGATIVE, default=3)
    bpair.add_argument("--dtype", default="float32")
    bpair.add_argument("overrides", nargs="*", help="config overrides for every variant, e.g. train.mode=lora")
    bpair.set_defaults(func=_bench_pair)
    btr = bench_sub.add_parser("trace", help="device time per step by kernel category, from `bench mesh --profile`")
    btr.add_argument("trace", help="trace.json.gz written by bench mesh --profile")
    btr.add_argument("--steps", type=POSITIVE, default=2, help="steps the trace holds (bench mesh --profile: 2)")
    btr.add_argument("--top", type=POSITIVE, default=15)
    btr.set_defaults(func=_bench_trace)
    batt = bench_sub.add_parser("attention", help="attention implementations: forward + backward time and error")
    batt.add_argument("--impls", type=_names, default="xla,dot_product,cudnn,cudnn_causal")
    batt.add_argument("--batch", type=POSITIVE, default=1)
    batt.add_argument("--seq", type=POSITIVE, default=4096)
    batt.add_argument("--heads", type=POSITIVE, default=32)
    batt.add_argument("--kv-heads", type=POSITIVE, default=32)
    batt.add_argument("--head-dim", type=POSITIVE, default=128)
    batt.add_argument("--dtype", default="bfloat16")
    batt.add_argument("--docs", type=POSITIVE, default=1, help="packed documents per row")
    batt.add_argument("--steps", type=POSITIVE, default=10)
    batt.set_defaults(func=_bench_attention)


def _add_bench_compare(bench_sub) -> None:
    """bench baseline, convert, memory, decode: side by side with references."""
    bbase = bench_sub.add_parser("baseline", help="our step vs transformers+torch (and PEFT) on the same batch")
    bbase.add_argument("--model", default="bench-60m")
    bbase.add_argument("--seq", type=POSITIVE, default=256)
    bbase.add_argument("--batch", type=POSITIVE, default=4)
    bbase.add_argument("--lora-rank", type=NON_NEGATIVE, default=8)
    bbase.add_argument("--warmup", type=NON_NEGATIVE, default=2)
    bbase.add_argument("--steps", type=POSITIVE, default=5)
    bbase.add_argument("--dtype", default="float32", help="bfloat16: ours in bf16 compute, torch under autocast")
    bbase.add_argument("--sides", choices=("both", "ours", "torch"), default="both",
                       help="one side only (on a GPU, run each in its own process)")
    bbase.add_argument("--modes", type=_names, default="full,lora", help="rows to run: full, lora or both (default)")
    bbase.add_argument("overrides", nargs="*", help="more config overrides (both sides), e.g. model.num_layers=8 "
                                                    "lora.targets=[wq,wv] lora.base_dtype=bfloat16 model.remat=full")
    bbase.set_defaults(func=_bench_baseline)
    bconv = bench_sub.add_parser("convert", help="hf-to-jax and jax-to-hf on a 70B-width checkpoint: RSS, GB/s")
    bconv.add_argument("--layers", type=POSITIVE, default=2, help="layers of LLaMA2-70B's width (2: ~4.4 GB in bf16)")
    bconv.add_argument("--workdir", default=None, help="where to put the temporary checkpoints")
    bconv.set_defaults(func=_bench_convert)
    bmem = bench_sub.add_parser("memory", help="planner (XLA memory analysis) vs measured memory, "
                                               "simulated CPU devices")
    bmem.add_argument("--config", help="a recipe YAML (default: the built-in defaults)")
    bmem.add_argument("--model", default="bench-60m")
    bmem.add_argument("--layouts", type=_layouts, default="fsdp=8;data=2,fsdp=2,tensor=2;data=8",
                      help='";"-separated ici layouts')
    bmem.add_argument("--seq", type=POSITIVE, default=256)
    bmem.add_argument("--batch", type=POSITIVE, default=8)
    bmem.add_argument("--devices", type=POSITIVE, default=8)
    bmem.add_argument("overrides", nargs="*", help="more config overrides, e.g. train.mode=lora")
    bmem.set_defaults(func=_bench_memory)
    bdec = bench_sub.add_parser("decode", help="KV-cache decoding tokens/s beside transformers' generate")
    bdec.add_argument("--model", default="bench-60m", help="model preset (random weights, shared by both)")
    bdec.add_argument("--batches", type=_positive_list, default=(1, 16, 64), help="comma-separated batch sizes")
    bdec.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="both sides: parameters and computation")
    bdec.add_argument("--prompt-len", type=POSITIVE, default=64)
    bdec.add_argument("--new-tokens", type=POSITIVE, default=64)
    bdec.add_argument("--repeats", type=POSITIVE, default=5,
                      help="interleaved runs of each side; the best and the median are reported")
    bdec.set_defaults(func=_bench_decode)
    bload = bench_sub.add_parser("load", help="peak resident memory of `generate` on a bf16 checkpoint vs its size")
    bload.add_argument("--model", default="llama2-13b", help="model preset whose width is used (random weights)")
    bload.add_argument("--layers", type=POSITIVE, default=2)
    bload.add_argument("--meshes", type=_layouts, default="tensor=4;none",
                       help='";"-separated decoding layouts; none: a single device')
    bload.add_argument("--devices", type=POSITIVE, default=4, help="simulated CPU devices")
    bload.add_argument("--dtypes", type=_names, default="bfloat16,float32",
                       help="comma-separated dtypes the bf16 checkpoint is loaded as")
    bload.set_defaults(func=_bench_load)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mellama-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run_commands, _add_plan, _add_generate, _add_eval, _add_convert, _add_prepare):
        add(sub)
    bench = sub.add_parser("bench", help="benchmarks with JSON output")
    bench_sub = bench.add_subparsers(dest="kind", required=True)
    _add_bench_speed(bench_sub)
    _add_bench_compare(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Usage and input errors end as one line on stderr and exit code 2; anything else is a bug, reported by a
    one-line summary and then its traceback (exit code 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "score"]:  # its own parser: `eval`'s options stay as they were
        argv = ["eval-score", *argv[2:]]
    args = build_parser().parse_args(argv)  # argparse: one line and exit code 2 for bad options
    from mellama_jax.compile_cache import enable as enable_compile_cache

    enable_compile_cache(args.command)  # before JAX compiles anything
    code, why = _run(args)
    from mellama_jax import distributed

    distributed.leave(code, why)  # this job's other processes, if any, stop watching this one (or stop, if it failed)
    return code


def _run(args) -> tuple[int, str]:
    """(exit code, the error line if any)."""
    from mellama_jax.config import ConfigError
    from mellama_jax.data.corpus import BadRecord

    try:
        return args.func(args), ""
    except (ConfigError, FileNotFoundError, NotADirectoryError, BadRecord, ValueError) as e:
        line = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print("error: " + line, file=sys.stderr)
        return 2, line
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130, "interrupted"
    except BrokenPipeError:  # the reader went away (`... | head`): nothing left to say, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141, ""
    except Exception as e:
        import traceback

        print(f"error: internal error, please report it: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        return 1, f"internal error: {type(e).__name__}"


if __name__ == "__main__":
    sys.exit(main())
