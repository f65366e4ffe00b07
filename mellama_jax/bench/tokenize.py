"""`bench tokenize`: `prepare pretrain` against a plain single-process SentencePiece loop, same corpus, same run."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from mellama_jax.data.corpus import Report, read_documents
from mellama_jax.data.prepare import prepare_pretrain
from mellama_jax.data.tokenizer import Tokenizer


def bench_tokenize(corpus: str | Path, tokenizer: str | Path, fields: tuple[str, ...] = ("text",),
                   repeat: int = 8) -> dict:
    corpus = Path(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / f"corpus{corpus.suffix}"
        data = corpus.read_bytes()
        big.write_bytes(data * repeat)  # a few MB, so timings are not dominated by start-up

        tok = Tokenizer.load(tokenizer)
        start = time.perf_counter()
        baseline_tokens = 0
        for _, text in read_documents(big, fields, Report()):
            baseline_tokens += len(tok.sp.EncodeAsIds(text)) + 2
        baseline_s = time.perf_counter() - start

        start = time.perf_counter()
        manifest = prepare_pretrain({"corpus": [big]}, tokenizer, Path(tmp) / "out", {"corpus": fields},
                                    progress=False)
        prepare_s = time.perf_counter() - start
    tokens = manifest["sources"]["corpus"]["tokens"]
    assert tokens == baseline_tokens, (tokens, baseline_tokens)
    return {"benchmark": "tokenize", "corpus": str(corpus), "bytes": len(data) * repeat, "tokens": tokens,
            "cores": os.cpu_count(), "baseline_tokens_per_s": tokens / baseline_s,
            "prepare_tokens_per_s": tokens / prepare_s, "speedup": baseline_s / prepare_s,
            "note": "prepare includes writing ArrayRecord shards; baseline only encodes"}


if __name__ == "__main__":
    import sys

    print(json.dumps(bench_tokenize(*sys.argv[1:3], fields=tuple(sys.argv[3].split(",")) if len(sys.argv) > 3
                                    else ("text",)), indent=1))
