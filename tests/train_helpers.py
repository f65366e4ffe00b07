"""Small synthetic batches and a runner shared by the training tests."""

import jax
import numpy as np
from flax import nnx

from mellama_jax.config import load_config
from mellama_jax.train.step import build_trainer, make_train_step

TINY = [
    "model=tiny-gqa",
    "train.seq_len=16",
    "train.batch_size=8",
    "train.steps=20",
    "optimizer.learning_rate=3e-4",
    "optimizer.warmup_ratio=0.1",
]


def synthetic_batch(rng, batch: int, seq: int, vocab: int) -> dict:
    """Rows of two packed documents and some padding, with loss weights zero on padding and boundaries."""
    tokens = rng.integers(3, vocab, (batch, seq + 1))
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        a = rng.integers(2, seq - 4)
        b = rng.integers(a + 2, seq + 1)
        seg[r, :a], seg[r, a:b] = 1, 2
        pos[r, :a], pos[r, a:b] = np.arange(a), np.arange(b - a)
    weights = (seg > 0).astype(np.float32)
    # the last token of a document does not predict the next document's first token
    weights[:, :-1] *= seg[:, :-1] == seg[:, 1:]
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=pos, segment_ids=seg, loss_weights=weights)


def run_steps(overrides, batches, devices=None):
    cfg = load_config(None, TINY + list(overrides))
    from mellama_jax import sharding

    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer, state, frozen = build_trainer(cfg, mesh)
    step = make_train_step(trainer)
    losses = []
    for batch in batches:
        state, metrics = step(state, frozen, trainer.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    params = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state.params)}
    return losses, params, state, trainer


def single_device():
    return [jax.devices()[0]]


def logged_losses(run_dir) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run logs the steps after its checkpoint again)."""
    import json
    from pathlib import Path

    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out
