"""What commands read and write on disk: a model's config and tokenizer, parameters (with or without LoRA
adapters), and outputs written safely.

The destination rule, one for every command that writes a folder: the folder must not exist or be empty. With
`overwrite` it may replace a folder that the same kind of command wrote before (our marker file says so), and
nothing else: not a training run, a checkpoint, or a folder of the user's own files. A destination that is, or
holds, or lies inside one of the command's inputs is refused. Outputs are built in a hidden sibling folder and
renamed into place, so a failure leaves neither a partial output nor any folder it created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mellama_jax import storage
from mellama_jax.config import ConfigError, LoraConfig, ModelConfig, load_config, model_config_from_file

MARKER = ".mellama-output.json"  # {"kind": ...}: which command wrote this folder


class OutputError(ConfigError):
    """A destination that must not be written (exit code 2, one line)."""


def np_dtype(name: str):
    """numpy dtype for a config dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# --------------------------------------------------------------------------- writing


def output_kind(path: str | Path) -> str | None:
    """The kind of output our marker says `path` holds, or None."""
    try:
        return json.loads((storage.path(path) / MARKER).read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _describe(path: Path) -> str:
    if (path / "config.yaml").exists() and (path / "checkpoints").exists():
        return "a training run"
    if (path / "_CHECKPOINT_METADATA").exists() or (path / "_METADATA").exists():
        return "a checkpoint"
    kind = output_kind(path)
    return f"a '{kind}' output" if kind else "files this command did not write"


def _overlaps(a, b) -> bool:
    a, b = str(a).rstrip("/"), str(b).rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _absolute(location):
    """The absolute (for a local path, resolved) path object of a location, local or in a bucket."""
    return storage.path(location) if storage.is_remote(location) else Path(location).absolute().resolve()


def check_destination(dest: str | Path, kind: str, overwrite: bool = False, inputs=()) -> Path:
    """Raise OutputError unless `kind` may write `dest` (see the module's rule); returns the absolute path."""
    dest = _absolute(dest)
    for src in inputs:
        if src is not None and _overlaps(dest, _absolute(src)):
            raise OutputError(f"{dest}: the output would overlap the input {src}; choose another output folder")
    if not dest.exists():
        return dest
    if not dest.is_dir():
        raise OutputError(f"{dest}: exists and is not a folder")
    if not any(dest.iterdir()):
        return dest
    if not overwrite:
        raise OutputError(f"{dest}: exists and is not empty; choose a new folder (or --overwrite to replace an "
                          f"earlier '{kind}' output)")
    if output_kind(dest) != kind:
        raise OutputError(f"{dest}: holds {_describe(dest)}; --overwrite replaces only an earlier '{kind}' output")
    return dest


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p, returning the folders created (deepest last) so a failure can remove them again."""
    created = []
    for parent in reversed(path.parents):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_output(dest: str | Path, kind: str, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes `dest` (marked as `kind`), on failure it and any
    parent folders made for it are removed. `dest` is checked first (check_destination). In a bucket the folder
    is built locally and uploaded once complete, the marker last (storage.upload)."""
    dest = check_destination(dest, kind, overwrite, inputs)
    if storage.is_remote(dest):
        with _remote_output(dest, kind) as tmp:
            yield tmp
        return
    created = _make_parents(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}))
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


@contextlib.contextmanager
def _remote_output(dest, kind: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mellama-output-") as tmp:
        yield Path(tmp)
        (Path(tmp) / MARKER).write_text(json.dumps({"kind": kind}))
        storage.remove_tree(dest)  # an earlier output of this kind (check_destination allowed it), or nothing
        try:
            storage.upload(Path(tmp), dest, last=MARKER)
        except BaseException as e:
            storage.remove_tree(dest)  # no half-uploaded folder left behind
            if isinstance(e, OSError):  # the bucket or the network failed us: a one-line error, not a bug
                raise OutputError(f"{dest}: the upload failed ({type(e).__name__}: {e}); nothing was left "
                                  "there, run the command again") from None
            raise


def write_text_atomic(path, text: str) -> None:
    """Replace one file's contents all at once (a crash leaves the old or the new file, never half of one)."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path, data: bytes) -> None:
    """As write_text_atomic; in a bucket an object is replaced whole by one write."""
    path = storage.path(path)
    if storage.is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


# --------------------------------------------------------------------------- reading


def _configs_above(path: Path) -> Iterator[Path]:
    for folder in (path, *list(path.parents)[:3]):
        yield folder / "config.yaml"


def find_model_config(params: str | Path) -> tuple[ModelConfig, LoraConfig | None]:
    """The model (and, for a LoRA run's adapters, the LoRA settings) of a parameter folder: its model.yaml
    (hf-to-jax output) or the config.yaml of the run it belongs to, through the validated loaders."""
    params = Path(params)
    if not params.exists():
        raise FileNotFoundError(f"{params}: no such parameter folder")
    if (params / "model.yaml").exists():
        return model_config_from_file(params / "model.yaml"), None
    for candidate in _configs_above(params):
        if candidate.exists():
            cfg = load_config(candidate)
            return cfg.model, cfg.adapters
    raise ConfigError(f"{params}: not a parameter folder of ours (no model.yaml in it, no run config.yaml above "
                      "it); convert jax-to-hf also takes --model PRESET")


def find_tokenizer(params: str | Path) -> Path | None:
    """tokenizer.model in the parameter folder, else in the run folder it belongs to (the one holding its
    config.yaml), else in that run's training data (data.path)."""
    params = Path(params)
    if (params / "tokenizer.model").exists():
        return params / "tokenizer.model"
    for candidate in _configs_above(params):
        if candidate.exists():
            if (candidate.parent / "tokenizer.model").exists():
                return candidate.parent / "tokenizer.model"
            data_dir = Path(load_config(candidate).data.path)
            return data_dir / "tokenizer.model" if (data_dir / "tokenizer.model").exists() else None
    return None


def require_tokenizer(params: str | Path, tokenizer: str | Path | None = None) -> Path:
    """`tokenizer` if given (a file or a folder holding tokenizer.model), else the one found for `params`."""
    if tokenizer:
        path = Path(tokenizer)
        path = path / "tokenizer.model" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"{tokenizer}: no tokenizer.model there")
        return path
    if not Path(params).exists():
        raise FileNotFoundError(f"{params}: no such parameter folder")
    found = find_tokenizer(params)
    if found is None:
        raise FileNotFoundError(f"{params}: no tokenizer.model beside it, in its run or in its training data; "
                                "pass --tokenizer")
    return found


def load_model(params: str | Path, adapters: str | Path | None = None, model: ModelConfig | None = None,
               dtype: str = "float32", mesh=None, rules=None):
    """Our model with the parameters of `params` (hf-to-jax output, a run's params/) in `dtype`; with `adapters` (a
    LoRA run's adapters/), `params` is the frozen base and the adapters go on top. With a `mesh` (and the rule
    table), each parameter is restored straight into its layout there, cast as it is read: no device ever holds
    the whole model (`checkpoint.load_params`); without, everything goes on this host's first device."""
    import jax
    from flax import nnx

    from mellama_jax.model import init_abstract
    from mellama_jax.train.checkpoint import load_params

    def load(path, abstract):
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return load_params(path, abstract, jax.tree.map(lambda _: device, abstract))
        from mellama_jax.sharding import state_shardings

        return load_params(path, abstract, state_shardings(abstract, mesh, rules))

    cfg = dataclasses.replace(model or find_model_config(params)[0], param_dtype=dtype, dtype=dtype)
    if adapters is None:
        graphdef, abstract = nnx.split(init_abstract(cfg))
        return nnx.merge(graphdef, load(params, abstract))
    lora = adapters_config(adapters)
    graphdef, lora_abs, base_abs = nnx.split(init_abstract(cfg, lora), nnx.LoRAParam, ...)
    return nnx.merge(graphdef, load(adapters, lora_abs), load(params, base_abs))


def adapters_config(adapters: str | Path) -> LoraConfig:
    lora = find_model_config(adapters)[1]
    if lora is None:
        raise ConfigError(f"{adapters}: the run config above it is not a LoRA run")
    return lora
