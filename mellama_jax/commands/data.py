"""prepare pretrain, merge, instruct, overlap."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mellama_jax.data import sources
from mellama_jax.data.instruct import InstructDataRequest, prepare_instruct
from mellama_jax.data.prepare import Pending, PretrainDataRequest, merge, prepare_pretrain, summarize
from mellama_jax.eval.overlap import OverlapRequest, find_overlap
from mellama_jax.options import command, option

SOURCES_EPILOG = (
    "--source syntax (docs/data.md has every corpus of the paper):\n\n" + sources.__doc__.split("\n\n", 1)[1]
)


@command(PretrainDataRequest, epilog=SOURCES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
def pretrain(r: PretrainDataRequest) -> int:
    manifest = prepare_pretrain(r)
    if manifest is None:
        print(
            f"shard {r.shard_index} of {r.num_shards} done; the manifest is written when the last one "
            f"finishes (or: mellama-jax prepare merge --out {r.out})"
        )
        return 0
    print(summarize(manifest))
    print(f"wrote {r.out}/manifest.json (skipped records with file:line: {r.out}/<source>/*.done.json)")
    return 0


@dataclasses.dataclass(frozen=True)
class MergeRequest:
    out: str | Path = option(help="the shared --out of every shard")


@command(MergeRequest)
def merge_shards(r: MergeRequest) -> int:
    try:
        print(summarize(merge(r.out)))
    except Pending as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r.out}/manifest.json")
    return 0


@command(InstructDataRequest)
def instruct(r: InstructDataRequest) -> int:
    manifest = prepare_instruct(r)
    report = manifest["report"]
    print(
        f"{report['documents']:,} examples -> {manifest['rows']:,} rows of <= {manifest['seq_len']} tokens; "
        f"{manifest['response_tokens']:,} response tokens; {manifest['truncated']:,} truncated; "
        f"{report['skipped_total']:,} skipped {json.dumps(report['skipped'])}"
    )
    for line in report["skipped_examples"][:10]:
        print(f"  skipped {line}")
    print(f"wrote {r.out}/manifest.json")
    return 0


@command(OverlapRequest)
def overlap(r: OverlapRequest) -> int:
    report = find_overlap(r)
    print(
        f"{report['documents_scanned']:,} documents scanned in {report['seconds']:.1f} s "
        f"({report['workers']} processes); {report['documents_matched']:,} share a {report['n']}-word window "
        "with a test example"
    )
    for task, t in report["tasks"].items():
        print(
            f"  {task}: {t['overlapping']:,} of {t['examples']:,} examples overlap ({100 * t['share']:.2f}%); "
            f"{t['too_short']:,} shorter than {report['n']} words"
        )
    print(f"wrote {r.out}/overlap.json" + (f" and {report['filtered']}" if "filtered" in report else ""))
    return 0
