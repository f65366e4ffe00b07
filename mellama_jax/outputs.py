"""Outputs written safely, one destination rule for every command that writes a folder: the folder must not
exist or be empty. With `overwrite` it may replace a folder that the same kind of command wrote before (our
marker file says so), and nothing else: not a training run, a checkpoint, or a folder of the user's own files. A
destination that is, or holds, or lies inside one of the command's inputs is refused. Outputs are built in a
hidden sibling folder and renamed into place, so a failure leaves neither a partial output nor any folder it
created; in a bucket, built locally and uploaded when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mellama_jax import storage
from mellama_jax.config import ConfigError

MARKER = ".mellama-output.json"  # {"kind": ...}: which command wrote this folder


class OutputError(ConfigError):
    """A destination that must not be written (exit code 2, one line)."""


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
        raise OutputError(
            f"{dest}: exists and is not empty; choose a new folder (or --overwrite to replace an "
            f"earlier '{kind}' output)"
        )
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
                raise OutputError(
                    f"{dest}: the upload failed ({type(e).__name__}: {e}); nothing was left "
                    "there, run the command again"
                ) from None
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
