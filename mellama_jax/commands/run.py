"""info, train, plot, demo."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mellama_jax import distributed
from mellama_jax.config import load_config
from mellama_jax.demo import run_demo
from mellama_jax.info import describe
from mellama_jax.options import POSITIVE, command, option, overrides
from mellama_jax.plot import plot_run
from mellama_jax.train import loop
from mellama_jax.train.hooks import NoTargets


@dataclasses.dataclass(frozen=True)
class InfoRequest:
    model: str | None = option(None, "model preset name or YAML path (overrides the config's model)")
    config: str | None = option(None, "run config YAML")
    overrides: tuple[str, ...] = overrides("key=value config overrides, e.g. mesh.ici.tensor=8")


@command(InfoRequest)
def info(r: InfoRequest) -> int:
    print(describe(r.config, r.overrides, r.model))
    return 0


@dataclasses.dataclass(frozen=True)
class TrainRequest:
    config: str = option(help="a recipe YAML, e.g. configs/me-llama-13b-pretrain.yaml")
    overrides: tuple[str, ...] = overrides("key=value overrides, e.g. run.dir=runs/x train.steps=100")


@command(TrainRequest)
def train(r: TrainRequest) -> int:
    distributed.initialize()  # before anything touches the devices
    cfg = load_config(r.config, r.overrides)
    try:
        result = loop.train(cfg)
    except loop.NonFiniteLoss as e:  # a batch without targets is the data's fault: exit 2, as for other bad input
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, NoTargets) else 3
    return 0 if result["status"] == "finished" or result["status"].startswith("stopped") else 1


@dataclasses.dataclass(frozen=True)
class PlotRequest:
    run_dir: str | Path = option(positional=True)


@command(PlotRequest)
def plot(r: PlotRequest) -> int:
    for path in plot_run(r.run_dir):
        print(path)
    return 0


@dataclasses.dataclass(frozen=True)
class DemoRequest:
    out: str | Path = option("runs/demo", "output directory")
    devices: int = option(8, "simulated CPU devices", type=POSITIVE)


@command(DemoRequest)
def demo(r: DemoRequest) -> int:
    run_demo(r.out, r.devices)
    return 0
