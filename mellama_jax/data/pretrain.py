"""The pretraining input pipeline on Grain: per-source packed rows, mixed by weight, batched, sharded by process.

Packing is random access. For each source, every epoch shuffles its documents (seed, source, epoch) and lays
them end to end; row r is tokens [r*L, (r+1)*L) of that stream, so a document longer than a row continues in
the next one and nothing is lost or repeated within an epoch. Rows carry segment ids (one per document piece)
and positions that restart at each piece. Mixing happens between rows, so each source's share of *tokens*
equals its weight. Batches are slices of a global row order: process p of P takes rows
[k*B + p*B/P, k*B + (p+1)*B/P) of global batch k, so the global batch is the same for any number of processes,
and each process reads only its rows. The iterator's state is one index, saved with the checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import grain
import numpy as np

from mellama_jax.data.corpus import BadRecord, read_json_file

FORMATS = {
    "mellama-pretrain-v1": "pretraining data (`prepare pretrain` output)",
    "mellama-instruct-v1": "an instruction dataset (`prepare instruct` output)",
}


def read_manifest(directory: str | Path, expected: str | None = None) -> dict:
    """A prepared dataset's manifest; with `expected`, one of that format, or a one-line error naming the
    folder and what it holds instead (a pretrain config pointed at instruction data, or the reverse)."""
    manifest = read_json_file(
        Path(directory) / "manifest.json", "not a prepared dataset (run `mellama-jax prepare ...` first)"
    )
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if expected and found != expected:
        raise BadRecord(
            f"{directory}: data.path holds {FORMATS.get(found, f'an unknown format {found!r}')}, "
            f"but this run needs {FORMATS[expected]}; check data.path and train.mode"
        )
    return manifest


class PackedSource:
    """Endless random-access rows of `seq_len` tokens from one source's shuffled documents."""

    def __init__(
        self,
        directory: str | Path,
        source: str,
        seq_len: int,
        seed: int,
        split: str = "train",
        holdout_documents: int = 0,
        source_id: int = 0,
    ):
        directory = Path(directory)
        manifest = read_manifest(directory, "mellama-pretrain-v1")
        if source not in manifest["sources"]:
            raise BadRecord(f"{directory}/manifest.json: no source {source!r}; sources: {sorted(manifest['sources'])}")
        shards = manifest["sources"][source]["shards"]
        self.dtype = np.dtype(manifest["token_dtype"])
        self.reader = grain.sources.ArrayRecordDataSource(
            [str(directory / source / f"{s}.arrayrecord") for s in shards]
        )
        lengths = np.concatenate([np.load(directory / source / f"{s}.lengths.npy") for s in shards])
        if len(lengths) != len(self.reader):
            raise BadRecord(f"{directory / source}: {len(self.reader)} records but {len(lengths)} lengths")
        # A fixed split, independent of the epoch: the last `holdout_documents` of a seeded permutation.
        order = np.random.default_rng([seed, 7919]).permutation(len(lengths))
        if holdout_documents >= len(lengths):
            raise BadRecord(
                f"{directory / source}: holdout of {holdout_documents} leaves no training documents "
                f"({len(lengths)} in all)"
            )
        cut = len(lengths) - holdout_documents
        self.documents = np.sort(order[:cut] if split == "train" else order[cut:])
        self.lengths = lengths[self.documents].astype(np.int64)
        self.seq_len, self.seed, self.source_id = seq_len, seed, source_id
        self.source_key = int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "little")
        self.tokens_per_epoch = int(self.lengths.sum())
        if self.tokens_per_epoch == 0:
            raise BadRecord(
                f"{directory / source}: no {split} documents (see the skipped records in its *.done.json reports)"
            )
        self.rows_per_epoch = max(1, -(-self.tokens_per_epoch // seq_len))
        self.shuffle = split == "train"

    def __len__(self) -> int:
        return sys.maxsize

    @functools.lru_cache(maxsize=2)  # noqa: B019 (two epochs' orders, kept for the source's life on purpose)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.documents)
        perm = (
            np.random.default_rng([self.seed, self.source_key, epoch]).permutation(n) if self.shuffle else np.arange(n)
        )
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(self.lengths[perm], out=starts[1:])
        return perm, starts

    def __getitem__(self, row: int) -> dict:
        epoch, r = divmod(int(row), self.rows_per_epoch)
        perm, starts = self._epoch(epoch)
        lo, hi = r * self.seq_len, min((r + 1) * self.seq_len, self.tokens_per_epoch)
        tokens = np.zeros(self.seq_len, np.int32)
        segments = np.zeros(self.seq_len, np.int32)
        positions = np.zeros(self.seq_len, np.int32)
        d = int(np.searchsorted(starts, lo, side="right")) - 1
        segment = 0
        while d < len(perm) and starts[d] < hi:
            begin, end = max(lo, starts[d]), min(hi, starts[d + 1])
            record = np.frombuffer(self.reader[int(self.documents[perm[d]])], self.dtype)
            piece = record[begin - starts[d] : end - starts[d]]
            segment += 1
            tokens[begin - lo : end - lo] = piece
            segments[begin - lo : end - lo] = segment
            positions[begin - lo : end - lo] = np.arange(len(piece))
            d += 1
        return {
            "tokens": tokens,
            "segment_ids": segments,
            "positions": positions,
            "source_id": np.int32(self.source_id),
        }


def to_example(row: dict) -> dict:
    """inputs/targets for next-token prediction; a target counts only inside the same document piece."""
    tokens, seg = row["tokens"], row["segment_ids"]
    targets = np.roll(tokens, -1)
    weights = ((seg > 0) & (seg == np.roll(seg, -1))).astype(np.float32)
    weights[-1] = 0.0
    return {
        "inputs": tokens,
        "targets": targets,
        "positions": row["positions"],
        "segment_ids": seg,
        "loss_weights": weights,
        "source_ids": np.full_like(seg, row["source_id"]),
    }


def empty_like(example: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in example.items()}


def pad_to_batches(rows: grain.MapDataset, global_batch: int) -> grain.MapDataset:
    """Append all-padding rows (zero loss weight) up to whole global batches: evaluation sees every row."""
    n = len(rows)
    padded = -(-n // global_batch) * global_batch
    if padded == n:
        return rows
    blank = empty_like(rows[0])
    return grain.MapDataset.range(padded).map(lambda i: rows[i] if i < n else blank)


def shard_batches(rows: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not divide over {process_count} processes")
    if len(rows) < sys.maxsize:  # finite: whole global batches only, so every process sees the same count
        rows = rows[: len(rows) // global_batch * global_batch]
    return rows.batch(global_batch // process_count)[process_index::process_count]


def pretrain_batches(
    directory: str | Path,
    weights: dict[str, float],
    seq_len: int,
    global_batch: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    holdout_documents: int = 0,
) -> grain.MapDataset:
    """This process's part of each global batch, as a random-access (and so exactly resumable) dataset."""
    active = {name: w for name, w in weights.items() if w > 0}
    if not active:
        raise ValueError("the mixture needs at least one source with a positive weight")
    sources = [
        grain.MapDataset.source(PackedSource(directory, name, seq_len, seed, split, holdout_documents, i))
        for i, name in enumerate(active)
    ]
    rows = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, list(active.values()))
    return shard_batches(rows.map(to_example), global_batch, process_index, process_count)


def iterate(batches: grain.MapDataset, threads: int = 2, prefetch: int = 4):
    """A checkpointable iterator (`get_state()` / `set_state()`) with background reading."""
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))


def pretrain_epoch_rows(
    directory: str | Path, weights: dict[str, float], seq_len: int, seed: int = 0, holdout_documents: int = 0
) -> int:
    """Rows in one pass over every active source's training documents (what "one epoch" means here)."""
    return sum(
        PackedSource(directory, name, seq_len, seed, "train", holdout_documents).rows_per_epoch
        for name, w in weights.items()
        if w > 0
    )


def pretrain_eval_batches(
    directory: str | Path,
    weights: dict[str, float],
    seq_len: int,
    global_batch: int,
    seed: int,
    holdout_documents: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """One pass over the held-out documents of every active source, in a fixed order."""
    active = [name for name, w in weights.items() if w > 0]  # source ids as in pretrain_batches: active ones
    sources = [
        PackedSource(directory, name, seq_len, seed, "eval", holdout_documents, i) for i, name in enumerate(active)
    ]
    index = [(s, r) for s, src in enumerate(sources) for r in range(src.rows_per_epoch)]
    rows = grain.MapDataset.source(index).map(lambda sr: to_example(sources[sr[0]][sr[1]]))
    return shard_batches(pad_to_batches(rows, global_batch), global_batch, process_index, process_count)
