"""A run directory: checked before anything is written into it, then made self-describing.

A run directory is new (or empty), or it holds an earlier run of the same configuration, which is then resumed.
It carries its config.yaml and the tokenizer of its data, so `generate`, `eval` and `convert` work on
`RUN/params` (or `RUN/adapters`) with no further flags.
"""

from __future__ import annotations

import yaml

from mellama_jax import storage
from mellama_jax.config import Config, ConfigError, load_config, to_dict
from mellama_jax.outputs import OutputError, write_bytes_atomic, write_text_atomic

# Settings that may change between a run and its resumption: how it is laid out, logged and saved, not what
# it computes (a checkpoint restores onto any mesh; attention kernels and remat give the same numbers), and its
# length (train.steps / epochs: a run may be extended or cut short; the schedule follows the new length);
# data.template only checks what the data were prepared with.
RESUMABLE_CHANGES = (
    "run.",
    "checkpoint.",
    "mesh.",
    "data.read_threads",
    "data.template",
    "model.attention",
    "model.remat",
    "model.scan_unroll",
    "model.scan_layers",
    "model.max_segments",
    "train.steps",
    "train.epochs",
)


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ, except those a resumption may change."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not k.startswith(RESUMABLE_CHANGES)]


def check_run_dir(cfg: Config) -> None:
    """Raise (one line, before anything is written) unless `cfg` may start or resume in cfg.run.dir."""
    run_dir = storage.path(cfg.run.dir)
    if cfg.train.init_from and not storage.path(cfg.train.init_from).exists():
        raise FileNotFoundError(f"train.init_from={cfg.train.init_from}: no such parameter folder")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise OutputError(f"run.dir={run_dir}: exists and is not a folder")
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        if any(run_dir.iterdir()):
            raise OutputError(f"run.dir={run_dir}: holds files but no run (no config.yaml); choose a new run.dir")
        return
    try:
        saved = load_config(storage.fetch(str(saved_path)))
    except ConfigError as e:
        raise ConfigError(f"run.dir={run_dir}: cannot resume, its config.yaml does not load ({e})") from None
    differ = config_differences(saved, cfg)
    if differ:
        shown = ", ".join(f"{k}: {_get(saved, k)!r} -> {_get(cfg, k)!r}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(
            f"run.dir={run_dir}: holds a run with another configuration ({shown}{more}); "
            "resume with the same settings or choose a new run.dir"
        )


def _get(cfg: Config, dotted: str):
    return _flat(to_dict(cfg)).get(dotted)


def write_run_files(cfg: Config) -> None:
    """config.yaml, and the data's tokenizer.model so that the run's exports find it."""
    run_dir = storage.path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tokenizer = storage.path(cfg.data.path) / "tokenizer.model"
    if tokenizer.exists() and not (run_dir / "tokenizer.model").exists():
        write_bytes_atomic(run_dir / "tokenizer.model", tokenizer.read_bytes())


def open_run_dir(cfg: Config) -> None:
    check_run_dir(cfg)
    write_run_files(cfg)
