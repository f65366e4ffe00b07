"""Prepared instruction examples (`prepare instruct`'s rows) read back for training and evaluation: next-token
targets weighted on response tokens only, positions restarting in each packed example, batched on Grain."""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from mellama_jax.data.pretrain import pad_to_batches, read_manifest, shard_batches


class InstructSource:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        manifest = read_manifest(directory, "mellama-instruct-v1")
        self.seq_len = manifest["seq_len"]
        self.reader = grain.sources.ArrayRecordDataSource([str(directory / "examples.arrayrecord")])

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.frombuffer(self.reader[index], np.int32).reshape(3, -1)


def instruct_example(row: np.ndarray, seq_len: int) -> dict:
    n = min(row.shape[1], seq_len)
    ids, w, seg = (np.zeros(seq_len, np.int32) for _ in range(3))
    ids[:n], w[:n], seg[:n] = row[0, :n], row[1, :n], row[2, :n]
    positions = np.zeros(seq_len, np.int32)
    for s in np.unique(seg[seg > 0]):
        where = np.flatnonzero(seg == s)
        positions[where] = np.arange(len(where))
    next_seg = np.roll(seg, -1)
    weights = ((np.roll(w, -1) > 0) & (seg > 0) & (seg == next_seg)).astype(np.float32)
    weights[-1] = 0.0
    return {
        "inputs": ids,
        "targets": np.roll(ids, -1),
        "positions": positions,
        "segment_ids": seg,
        "loss_weights": weights,
    }


def instruct_batches(
    directory: str | Path,
    seq_len: int,
    global_batch: int,
    epochs: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    pad: bool = False,
) -> grain.MapDataset:
    """Epochs of examples, reshuffled each epoch, as this process's part of each global batch.

    pad: complete the last global batch with padding rows (for evaluation) instead of dropping it.
    """
    ds = grain.MapDataset.source(InstructSource(directory))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(epochs).map(lambda row: instruct_example(row, seq_len))
    if pad:
        ds = pad_to_batches(ds, global_batch)
    return shard_batches(ds, global_batch, process_index, process_count)
