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

    run_demo(args.out, args.devices)
    return 0


def _name_values(items: list[str], what: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"error: {what} {item!r} is not of the form NAME=VALUE[,VALUE...]")
        name, values = item.split("=", 1)
        out.setdefault(name, []).extend(v for v in values.split(",") if v)
    return out


def _prepare_pretrain(args) -> int:
    from mellama_jax.data.prepare import prepare_pretrain, summarize

    fields = {k: tuple(v) for k, v in _name_values(args.fields, "--fields").items()}
    manifest = prepare_pretrain(_name_values(args.source, "--source"), args.tokenizer, args.out, fields,
                                strict=args.strict, threads=args.threads)
    print(summarize(manifest))
    print(f"wrote {args.out}/manifest.json (skipped records with file:line: {args.out}/<source>/*.done.json)")
    return 0


def _prepare_instruct(args) -> int:
    import json

    from mellama_jax.data.instruct import prepare_instruct

    manifest = prepare_instruct(args.inputs, args.tokenizer, args.out, args.seq_len, args.template, args.format,
                                args.truncation, args.pack, args.strict, not args.no_eos_loss)
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

    from mellama_jax.bench.tokenize import bench_tokenize

    result = bench_tokenize(args.corpus, args.tokenizer, tuple(args.fields.split(",")), args.repeat)
    print(json.dumps(result, indent=1))
    return 0


def _train(args) -> int:
    from mellama_jax import distributed

    distributed.initialize()  # before anything touches the devices
    from mellama_jax.config import load_config
    from mellama_jax.train.loop import NonFiniteLoss, train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0 if result["status"] == "finished" or result["status"].startswith("stopped") else 1


def _plot(args) -> int:
    from mellama_jax.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _model_arg(name):
    if not name:
        return None
    from mellama_jax.config import load_model_preset

    return load_model_preset(name)


def _convert(args) -> int:
    import json

    from mellama_jax.convert import api

    if args.direction == "hf-to-jax":
        from mellama_jax.sharding import parse_layout

        print(api.hf_to_jax(args.src, args.dst, args.dtype, mesh_shape=parse_layout(args.mesh) if args.mesh else None))
    elif args.direction == "jax-to-hf":
        print(api.jax_to_hf(args.src, args.dst, _model_arg(args.model), args.tokenizer, args.dtype,
                            _size(args.shard_size), args.adapters, args.merge))
    else:
        report = api.verify(args.src, args.dst, model=_model_arg(args.model))
        ok = report["max_abs_logit_diff"] <= args.max_logit_diff and report["mean_kl"] <= args.max_kl
        print(json.dumps(dict(report, ok=ok), indent=1))
        return 0 if ok else 1
    return 0


def _bench_mesh(args) -> int:
    import json

    import jax

    if args.devices:
        jax.config.update("jax_num_cpu_devices", args.devices)
    from mellama_jax.bench.mesh import bench_mesh, markdown

    result = bench_mesh(args.model, args.layouts.split(";"), args.seq, args.batch, args.remat, args.dtype,
                        args.warmup, args.steps, args.png, args.overrides, args.profile)
    print(markdown(result))
    print(json.dumps(result, indent=1))
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

    from mellama_jax.bench.attention import bench_attention

    print(json.dumps(bench_attention(args.impls.split(","), args.batch, args.seq, args.heads, args.kv_heads,
                                     args.head_dim, args.dtype, args.docs, args.steps), indent=1))
    return 0


def _bench_baseline(args) -> int:
    import json

    from mellama_jax.bench.mesh import bench_baseline

    print(json.dumps(bench_baseline(args.model, args.seq, args.batch, args.lora_rank, args.warmup, args.steps,
                                    args.dtype, args.overrides, args.sides), indent=1))
    return 0


def _bench_convert(args) -> int:
    import json

    from mellama_jax.bench.convert import bench_convert

    print(json.dumps(bench_convert(args.layers, args.workdir), indent=1))
    return 0


def _bench_memory(args) -> int:
    import json

    from mellama_jax.bench.memory import bench_memory_layouts

    result = bench_memory_layouts(args.model, args.layouts.split(";"), args.seq, args.batch, args.overrides,
                                  args.devices)
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

    from mellama_jax.bench.decode import bench_decode

    batches = tuple(int(b) for b in args.batches.split(","))
    print(json.dumps(bench_decode(args.model, batches, args.prompt_len, args.new_tokens, args.repeats), indent=1))
    return 0


def _generate(args) -> int:
    from mellama_jax.eval.run import JaxBackend, continuation
    from mellama_jax.generate import generate, truncate_at_stop

    backend = JaxBackend(args.model, args.tokenizer, args.mesh, args.adapters)
    tok = backend.tokenizer
    ids = [tok.encode(p, bos=True) for p in args.prompt]
    out = generate(backend.model, ids, args.max_new_tokens, tok.eos_id, args.temperature, args.top_p, args.seed,
                   backend.mesh, backend.rules)
    for prompt, prompt_ids, row in zip(args.prompt, ids, out):
        print(prompt + truncate_at_stop(continuation(tok.decode, prompt_ids, row), args.stop or []))
    return 0


def _plan(args) -> int:
    from mellama_jax.bench.plan import run, run_tpu
    from mellama_jax.config import ConfigError

    overrides = list(args.overrides) + ([f"model.preset={args.model}"] if args.model else [])
    layouts = [l for l in (args.layouts or "").split(";") if l]
    if args.target == "tpu":
        if not args.topology:
            raise ConfigError("plan --target tpu needs --topology, e.g. v5p:4x4x4")
        print(run_tpu(args.config, overrides, args.topology, args.slices, layouts))
    elif not args.devices:
        raise ConfigError("plan needs --devices (simulated CPU devices), or --target tpu --topology ...")
    else:
        print(run(args.config, overrides, args.devices, layouts, args.memory_gb))
    return 0


def _eval(args) -> int:
    import json

    from mellama_jax.eval.run import evaluate

    summary = evaluate(args.task, args.data, args.model, args.prompts, args.out, args.backend, args.split,
                       args.limit, args.batch_size, args.max_new_tokens, args.fewshot, args.fewshot_data,
                       args.seed, args.mesh, args.bertscore_model, args.hf_tokenizer, args.adapters)
    print(json.dumps(summary, indent=1))
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

    tr = sub.add_parser("train", help="pretrain, lora or sft, as the config's train.mode says")
    tr.add_argument("--config", required=True, help="a recipe YAML, e.g. configs/me-llama-13b-pretrain.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.dir=runs/x train.steps=100")
    tr.set_defaults(func=_train)

    pl = sub.add_parser("plot", help="PNG loss and throughput curves of a run directory")
    pl.add_argument("run_dir")
    pl.set_defaults(func=_plot)

    pln = sub.add_parser("plan", help="compile the train step ahead of time on simulated devices (or a TPU "
                                      "topology): memory per device for each layout (nothing allocated)")
    pln.add_argument("--config", help="a recipe YAML")
    pln.add_argument("--model", help="model preset (overrides the config's)")
    pln.add_argument("--devices", type=int, help="simulated devices, e.g. 160")
    pln.add_argument("--layouts", help='";"-separated ici layouts, e.g. "fsdp=8;fsdp=4,tensor=2" (default: the config\'s mesh; '
                                       'tpu: fsdp=-1, the whole slice)')
    pln.add_argument("--memory-gb", type=float, default=80.0, help="device memory to fit (default 80)")
    pln.add_argument("--target", choices=("cpu", "tpu"), default="cpu",
                     help="tpu: compile for the chips of --topology with the TPU compiler (needs the tpu extra)")
    pln.add_argument("--topology", help="tpu: CHIP:SHAPE as JAX names TPU topologies, e.g. v5p:4x4x4 (64 chips)")
    pln.add_argument("--slices", type=int, default=1, help="tpu: slices of --topology, data parallel across them (dcn)")
    pln.add_argument("overrides", nargs="*")
    pln.set_defaults(func=_plan)

    gen = sub.add_parser("generate", help="batched decoding with a KV cache from a parameter checkpoint")
    gen.add_argument("--model", required=True, help="a parameter checkpoint (hf-to-jax output, a run's params/)")
    gen.add_argument("--tokenizer", help="tokenizer.model (default: found beside the checkpoint)")
    gen.add_argument("--prompt", action="append", required=True, help="repeatable: one batch of prompts")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--mesh", help='decode sharded over the devices, e.g. "data=4,tensor=2"')
    gen.add_argument("--adapters", help="a LoRA run's adapters/ directory (--model is then the base)")
    gen.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="a benchmark task with the authors' prompts and scoring (see --task)")
    from mellama_jax.eval.tasks import TASKS  # stdlib only: keeps --help fast

    ev.add_argument("--task", required=True, choices=sorted(TASKS))
    ev.add_argument("--data", required=True, help="the dataset's original file or folder (docs/evaluation.md)")
    ev.add_argument("--split", help="PubMedQA: the split's id -> label file (test_ground_truth.json)")
    ev.add_argument("--model", required=True, help="jax: a parameter checkpoint; hf: a Hugging Face directory")
    ev.add_argument("--backend", choices=["jax", "hf"], default="jax")
    ev.add_argument("--prompts", help="the authors' prompt_templates.json (needed for all but i2b2 and bionli)")
    ev.add_argument("--out", required=True)
    ev.add_argument("--limit", type=int)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, help="default: per task (16 for choices ... 256 for summaries)")
    ev.add_argument("--fewshot", type=int, default=0, help="k demonstrations from --fewshot-data (default 0)")
    ev.add_argument("--fewshot-data", help="the training split's file, same format as --data")
    ev.add_argument("--seed", type=int, default=0, help="which few-shot demonstrations are drawn")
    ev.add_argument("--mesh", help='jax: decode sharded over the devices, e.g. "data=4,tensor=2"')
    ev.add_argument("--adapters", help="jax: a LoRA run's adapters/ directory (--model is then the base)")
    ev.add_argument("--hf-tokenizer", choices=["sentencepiece", "transformers"], default="sentencepiece",
                    help="hf backend: tokenise with tokenizer.model as training did (default) or AutoTokenizer")
    ev.add_argument("--bertscore-model", help="summaries: a local model directory for BERTScore (else skipped)")
    ev.set_defaults(func=_eval)

    conv = sub.add_parser("convert", help="Hugging Face <-> JAX checkpoints, PEFT adapters, verification")
    conv_sub = conv.add_subparsers(dest="direction", required=True)
    h2j = conv_sub.add_parser("hf-to-jax", help="HF LLaMA directory (safetensors) -> parameter checkpoint")
    h2j.add_argument("src")
    h2j.add_argument("dst")
    h2j.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="default: keep the checkpoint's dtype (bit-exact round trips)")
    h2j.add_argument("--mesh", help="store pre-sharded for a mesh, e.g. fsdp=8,tensor=2 (default rule table)")
    j2h = conv_sub.add_parser("jax-to-hf", help="parameter checkpoint -> HF directory, or PEFT adapters")
    j2h.add_argument("src", help="a run's params/, a checkpoint's state/, or hf-to-jax output")
    j2h.add_argument("dst")
    j2h.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    j2h.add_argument("--shard-size", default="5GB", help="safetensors shard size, e.g. 5GB, 500MB")
    j2h.add_argument("--tokenizer", help="tokenizer.model (default: found beside SRC)")
    j2h.add_argument("--model", help="model preset or YAML (default: model.yaml or the run's config.yaml)")
    j2h.add_argument("--adapters", help="a LoRA run's adapters/: write PEFT adapters (or --merge)")
    j2h.add_argument("--merge", action="store_true", help="fold the adapters into a full model")
    ver = conv_sub.add_parser("verify", help="compare transformers and JAX logits on sample prompts")
    ver.add_argument("src", help="HF directory")
    ver.add_argument("dst", help="parameter checkpoint")
    ver.add_argument("--model", help="model preset or YAML (default: found beside the checkpoint)")
    ver.add_argument("--max-logit-diff", type=float, default=0.5)
    ver.add_argument("--max-kl", type=float, default=1e-3)
    for p in (h2j, j2h, ver):
        p.set_defaults(func=_convert)

    prepare = sub.add_parser("prepare", help="tokenise corpora or instruction data into ArrayRecord shards")
    prep_sub = prepare.add_subparsers(dest="kind", required=True)
    pre = prep_sub.add_parser("pretrain", help="pretraining corpora (JSONL, .txt, Parquet) -> token shards")
    pre.add_argument("--source", action="append", required=True,
                     help="NAME=FILE[,FILE...], repeatable, e.g. biomedical=pubmed.jsonl")
    pre.add_argument("--fields", action="append", help="NAME=FIELD[,FIELD...] text fields of a source "
                                                       "(joined by newlines; default: text)")
    pre.add_argument("--tokenizer", required=True, help="tokenizer.model or a directory holding it")
    pre.add_argument("--out", required=True)
    pre.add_argument("--threads", type=int, default=None, help="encoding threads (default: all cores)")
    pre.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    pre.set_defaults(func=_prepare_pretrain)
    ins = prep_sub.add_parser("instruct", help="Alpaca / ShareGPT / prompt-response JSON(L) -> examples")
    ins.add_argument("inputs", nargs="+")
    ins.add_argument("--tokenizer", required=True)
    ins.add_argument("--out", required=True)
    ins.add_argument("--seq-len", type=int, default=4096)
    ins.add_argument("--template", default="llama2_chat", help="llama2_chat, alpaca, or a template YAML file")
    ins.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "prompt_response"])
    ins.add_argument("--truncation", default="truncate", choices=["truncate", "drop"])
    ins.add_argument("--pack", action="store_true", help="pack several examples per row (with segment ids)")
    ins.add_argument("--no-eos-loss", action="store_true", help="do not train on the EOS after each response")
    ins.add_argument("--strict", action="store_true")
    ins.set_defaults(func=_prepare_instruct)

    bench = sub.add_parser("bench", help="benchmarks with JSON output")
    bench_sub = bench.add_subparsers(dest="kind", required=True)
    btok = bench_sub.add_parser("tokenize", help="`prepare pretrain` vs a single-process SentencePiece loop")
    btok.add_argument("--corpus", required=True, help="a JSONL/txt/Parquet corpus")
    btok.add_argument("--tokenizer", required=True)
    btok.add_argument("--fields", default="text")
    btok.add_argument("--repeat", type=int, default=8, help="repeat the corpus to reach a few MB")
    btok.set_defaults(func=_bench_tokenize)
    bmesh = bench_sub.add_parser("mesh", help="train-step throughput, MFU and memory per mesh layout")
    bmesh.add_argument("--model", default="bench-60m")
    bmesh.add_argument("--layouts", default="data=8;fsdp=8;fsdp=4,tensor=2", help='";"-separated ici layouts')
    bmesh.add_argument("--devices", type=int, default=0, help="simulated CPU devices (0: what is there)")
    bmesh.add_argument("--seq", type=int, default=256)
    bmesh.add_argument("--batch", type=int, default=8)
    bmesh.add_argument("--remat", default="none")
    bmesh.add_argument("--dtype", default="float32")
    bmesh.add_argument("--warmup", type=int, default=2)
    bmesh.add_argument("--steps", type=int, default=5)
    bmesh.add_argument("--png", help="bar chart output path")
    bmesh.add_argument("--profile", help="folder for a device trace and the optimized HLO of each layout")
    bmesh.add_argument("overrides", nargs="*", help="more config overrides, e.g. model.num_layers=8 model.attention=cudnn")
    bmesh.set_defaults(func=_bench_mesh)
    btr = bench_sub.add_parser("trace", help="device time per step by kernel category, from `bench mesh --profile`")
    btr.add_argument("trace", help="trace.json.gz written by bench mesh --profile")
    btr.add_argument("--steps", type=int, default=2, help="steps the trace holds (bench mesh --profile: 2)")
    btr.add_argument("--top", type=int, default=15)
    btr.set_defaults(func=_bench_trace)
    batt = bench_sub.add_parser("attention", help="attention implementations: forward + backward time and error")
    batt.add_argument("--impls", default="xla,dot_product,cudnn,cudnn_causal")
    batt.add_argument("--batch", type=int, default=1)
    batt.add_argument("--seq", type=int, default=4096)
    batt.add_argument("--heads", type=int, default=32)
    batt.add_argument("--kv-heads", type=int, default=32)
    batt.add_argument("--head-dim", type=int, default=128)
    batt.add_argument("--dtype", default="bfloat16")
    batt.add_argument("--docs", type=int, default=1, help="packed documents per row")
    batt.add_argument("--steps", type=int, default=10)
    batt.set_defaults(func=_bench_attention)
    bbase = bench_sub.add_parser("baseline", help="our step vs transformers+torch (and PEFT) on the same batch")
    bbase.add_argument("--model", default="bench-60m")
    bbase.add_argument("--seq", type=int, default=256)
    bbase.add_argument("--batch", type=int, default=4)
    bbase.add_argument("--lora-rank", type=int, default=8)
    bbase.add_argument("--warmup", type=int, default=2)
    bbase.add_argument("--steps", type=int, default=5)
    bbase.add_argument("--dtype", default="float32", help="bfloat16: ours in bf16 compute, torch under autocast")
    bbase.add_argument("--sides", choices=("both", "ours", "torch"), default="both",
                       help="one side only (on a GPU, run each in its own process)")
    bbase.add_argument("overrides", nargs="*", help="more config overrides (both sides), e.g. model.num_layers=8")
    bbase.set_defaults(func=_bench_baseline)
    bconv = bench_sub.add_parser("convert", help="hf-to-jax and jax-to-hf on a 70B-width checkpoint: RSS, GB/s")
    bconv.add_argument("--layers", type=int, default=2, help="layers of LLaMA2-70B's width (2: ~4.4 GB in bf16)")
    bconv.add_argument("--workdir", default=None, help="where to put the temporary checkpoints")
    bconv.set_defaults(func=_bench_convert)
    bmem = bench_sub.add_parser("memory", help="planner (XLA memory analysis) vs measured memory, simulated CPU devices")
    bmem.add_argument("--model", default="bench-60m")
    bmem.add_argument("--layouts", default="fsdp=8;data=2,fsdp=2,tensor=2;data=8")
    bmem.add_argument("--seq", type=int, default=256)
    bmem.add_argument("--batch", type=int, default=8)
    bmem.add_argument("--devices", type=int, default=8)
    bmem.add_argument("overrides", nargs="*", help="more config overrides, e.g. train.mode=lora")
    bmem.set_defaults(func=_bench_memory)
    bdec = bench_sub.add_parser("decode", help="KV-cache decoding tokens/s beside transformers' generate")
    bdec.add_argument("--model", default="bench-60m", help="model preset (random weights, shared by both)")
    bdec.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    bdec.add_argument("--prompt-len", type=int, default=64)
    bdec.add_argument("--new-tokens", type=int, default=64)
    bdec.add_argument("--repeats", type=int, default=3)
    bdec.set_defaults(func=_bench_decode)

    demo = sub.add_parser("demo", help="a small end-to-end run on the embedded medical-text sample")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mellama_jax.config import ConfigError
    from mellama_jax.data.corpus import BadRecord

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, BadRecord, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
