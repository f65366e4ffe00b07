"""Where files live: local folders, or a Google Cloud Storage bucket (gs://).

Cloud TPU pods have no shared disk, so a run that several hosts write, and data every host reads, live in a
bucket. What each kind of file does there:
- Orbax checkpoints and parameter folders (a run's checkpoints/, params/, adapters/, `train.init_from`) are read
  and written in place: Orbax names paths with etils.epath, whose gs:// and s3:// backends are gcsfs and s3fs,
  and writes arrays through TensorStore's gcs and s3 drivers.
- Inputs that a library reads as local files (ArrayRecord shards, sentencepiece models, safetensors, a parameter
  folder that the converters read) are fetched once into a local cache (`fetch`): MELLAMA_CACHE, default
  ~/.cache/mellama-jax (it must be on the host's own disk, not shared between hosts), mirroring the bucket's
  paths; a file is fetched again when its size differs or the object was written after the copy was made; under
  a lock, so that the processes of one host fetch it once.
- Folder outputs (convert, eval, prepare) are built locally and uploaded when complete, their marker file last
  (`upload`): a bucket has no rename, and a folder without the marker is not taken for a finished output.
- A run directory's small files (metrics.jsonl, TensorBoard events, plots) are written to a local mirror and
  uploaded at each checkpoint and at the end (`RunMirror`): an object cannot be appended to.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock

FETCH_STREAMS = 8  # objects fetched at once


def is_remote(path: str | os.PathLike | None) -> bool:
    """A URL (scheme://...) rather than a local path."""
    return path is not None and "://" in str(path)


def path(location: str | os.PathLike):
    """A path object for `location`: pathlib's (absolute) for a local one, etils.epath's for a bucket."""
    if not is_remote(location):
        return Path(location).absolute()
    text = str(location)
    if not text.startswith("gs://"):  # s3:// would take s3fs and TensorStore's s3 driver: not tested, not offered
        raise FileNotFoundError(f"{text}: only local paths and gs:// buckets are supported")
    try:
        import gcsfs  # noqa: F401  (etils.epath's backend for gs://)
    except ImportError:
        raise FileNotFoundError(
            f"{text}: gs:// paths need the gcsfs package (pip install 'mellama-jax[gcs]')"
        ) from None
    import fsspec.config
    from etils import epath

    # gcsfs keeps folder listings for the life of the process: a file another host (or process) writes later would
    # never be seen by exists(). The processes of a run share the bucket, so every question goes to the bucket.
    fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False

    return epath.Path(text)


def cache_root() -> Path:
    return Path(os.environ.get("MELLAMA_CACHE") or Path.home() / ".cache" / "mellama-jax")


def cached(remote: str) -> Path:
    """Where `fetch` puts `remote`: the cache, then the scheme and the bucket's path."""
    scheme, _, rest = str(remote).partition("://")
    return cache_root() / scheme / rest.strip("/")


def _fetch_file(src, dest: Path) -> None:
    remote = src.stat()
    size = remote.length
    if dest.is_file() and dest.stat().st_size == size and dest.stat().st_mtime >= remote.mtime:
        return  # fetched after the object was last written
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
    try:
        with src.open("rb") as r, open(tmp, "wb") as w:
            shutil.copyfileobj(r, w, 16 << 20)
        got = tmp.stat().st_size
        if got != size:
            raise OSError(f"{src}: fetched {got} bytes of {size}")
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a broken transfer leaves no partial copy behind
        raise


CONTEXT = ("config.yaml", "model.yaml", "tokenizer.model")  # what commands look for beside and above a folder


def fetch(remote: str | os.PathLike, context: int = 0) -> Path:
    """The local copy of a remote file or folder (the folder's whole tree), each file fetched unless its cached
    copy has its size and is newer than it; with `context`, also the CONTEXT files of that many folders above it
    (a run's config.yaml and tokenizer beside its params/). A local path is returned as it is. A failed transfer
    is a one-line ValueError naming the location."""
    if not is_remote(remote):
        return Path(remote)
    src, dest = path(remote), cached(str(remote))
    if not src.exists():
        raise FileNotFoundError(f"{remote}: no such file or folder")
    try:
        _fetch(src, dest, context)
    except FileNotFoundError:
        raise
    except OSError as e:  # the bucket or the network failed us
        raise ValueError(f"{remote}: fetching it failed ({type(e).__name__}: {e}); run the command again") from None
    return dest


def _fetch(src, dest: Path, context: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if src.is_dir():
            top, relatives = str(src).partition("://")[2], []
            for root, _, files in src.walk():  # (etils gives `root` without its scheme: only its tail is used)
                below = str(root).partition("://")[2] or str(root)
                relatives += [f"{below[len(top) :]}/{name}".strip("/") for name in files]
            with ThreadPoolExecutor(FETCH_STREAMS) as pool:  # one stream per object is slower than a VM's link
                list(pool.map(lambda relative: _fetch_file(src / relative, dest / relative), relatives))
        else:
            _fetch_file(src, dest)
        folder, local = src, dest
        below_bucket = len(str(src).partition("://")[2].strip("/").split("/")) - 1
        for _ in range(min(context, below_bucket)):  # never above the bucket itself
            folder, local = folder.parent, local.parent
            for name in CONTEXT:
                if (folder / name).exists():
                    _fetch_file(folder / name, local / name)


def upload(local: Path, remote: str | os.PathLike, last: str | None = None, names=None) -> None:
    """Copy the files of folder `local` (or only `names`, relative paths) to `remote`; the file `last` after all
    the others, so that its presence says the upload is complete."""
    dest = path(remote)
    files = (
        [Path(n) for n in names]
        if names is not None
        else sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    )
    ordered = [f for f in files if str(f) != last]
    if last is not None and (local / last).exists():
        ordered.append(Path(last))
    for relative in ordered:
        target = dest / str(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(local / relative, "rb") as r, target.open("wb") as w:
            shutil.copyfileobj(r, w, 16 << 20)


def remove_tree(location) -> None:
    target = path(location)
    if target.exists():
        target.rmtree() if is_remote(location) else shutil.rmtree(target)


class RunMirror:
    """A remote run directory's small files, kept in a local folder (`local`) and uploaded by `sync`; for a local
    run directory, the run directory itself, and `sync` does nothing."""

    FILES = ("metrics.jsonl", "tensorboard", "loss.png", "throughput.png")  # appended to or rewritten

    def __init__(self, run_dir: str):
        self.run_dir, self.remote = run_dir, is_remote(run_dir)
        self.local = cached(run_dir) if self.remote else Path(run_dir)

    def pull(self) -> None:
        """Start from what an earlier attempt uploaded (a resumed run appends to its metrics)."""
        if not self.remote:
            return
        self.local.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            stale = self.local / name
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
            if path(f"{self.run_dir}/{name}").exists():
                fetch(f"{self.run_dir}/{name}")

    def sync(self, *_) -> None:
        """Upload the mirrored files; a failure is a warning (the next checkpoint's sync tries again), never the end
        of a run whose checkpoints are safe."""
        if not self.remote:
            return
        try:
            self._upload()
        except (OSError, ValueError) as e:
            print(
                f"warning: {self.run_dir}: uploading metrics failed ({type(e).__name__}: {e}); retried at the next "
                "checkpoint",
                file=sys.stderr,
                flush=True,
            )

    close = sync  # the run's last upload (contextlib.closing)

    def _upload(self) -> None:
        names = [
            p.relative_to(self.local)
            for name in self.FILES
            for p in (
                self.local.joinpath(name).rglob("*") if self.local.joinpath(name).is_dir() else [self.local / name]
            )
            if p.is_file()
        ]
        upload(self.local, self.run_dir, names=names)
