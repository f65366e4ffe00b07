"""PNG curves of a run from its metrics.jsonl: loss (train, eval, and eval per source) and throughput."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics here (is this a run directory?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
    return records


def plot_run(run_dir: str | Path) -> list[Path]:
    # here, not at the top: pyplot takes a second to import, and most runs plot only at their end
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval (held out)")
        for key in sorted({k for r in evals for k in r if k.startswith("loss/")}):  # per source of the mixture
            points = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot(*zip(*points), ".--", label=f"eval: {key[5:]}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"loss: {run_dir.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run_dir / "loss.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
    if train and "tokens_per_s" in train[0]:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], label="tokens/s")
        ax.set(xlabel="step", ylabel="tokens/s", title=f"throughput: {run_dir.name}")
        if "mfu" in train[0]:
            twin = ax.twinx()
            twin.plot([r["step"] for r in train], [100 * r["mfu"] for r in train], "r--", label="MFU %")
            twin.set_ylabel("MFU (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(run_dir / "throughput.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
