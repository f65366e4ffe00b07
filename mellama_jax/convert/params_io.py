"""Parameter checkpoints read and written one tensor slice at a time, through TensorStore.

Reading works on any Orbax checkpoint that holds our parameters: a run's `params/` or `adapters/` export, a
training checkpoint's `checkpoints/<step>/state` (written by any number of devices or processes; OCDBT), or
what `write_params` produced. A stacked parameter is read one layer at a time.

Writing produces an Orbax PyTree checkpoint in its documented non-OCDBT layout (one zarr array per parameter,
chunked by layer, plus `_METADATA`), so `orbax.checkpoint.StandardCheckpointer().restore` and the trainer's
`init_from` read it directly, onto any mesh, each device reading only the chunks it needs.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import tensorstore as ts

from mellama_jax.convert.hf import ConversionError


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if str(dtype) == "bfloat16" else np.dtype(dtype).str


class ParamsReader:
    """Our parameters (path tuples such as ('layers', 'attn', 'wq', 'kernel')) inside an Orbax checkpoint."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        meta_path = self.directory / "_METADATA"
        if not meta_path.exists():
            raise ConversionError(f"{self.directory}: not an Orbax checkpoint (no _METADATA)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{meta_path}: corrupt ({e})") from None
        self.use_ocdbt = meta.get("use_ocdbt", False)
        self.use_zarr3 = meta.get("use_zarr3", False)
        self.names: dict[tuple[str, ...], str] = {}
        for key in meta["tree_metadata"]:
            parts = tuple(ast.literal_eval(key))
            ours = parts[1:] if parts[:1] == ("params",) else parts  # a TrainState's parameters
            ours = ours[:-1] if ours[-1:] == ("value",) else ours  # nnx.Variable's value field
            if parts[:1] in (("step",), ("opt_state",)):
                continue
            self.names[ours] = ".".join(parts)
        self._open: dict[tuple[str, ...], ts.TensorStore] = {}

    def paths(self) -> list[tuple[str, ...]]:
        return sorted(self.names)

    def _store(self, path: tuple[str, ...]) -> ts.TensorStore:
        if path not in self._open:
            if path not in self.names:
                raise ConversionError(
                    f"{self.directory}: no parameter {'/'.join(path)} (it holds {len(self.names)} arrays)"
                )
            kvstore = (
                {"driver": "ocdbt", "base": f"file://{self.directory}/", "path": self.names[path]}
                if self.use_ocdbt
                else {"driver": "file", "path": str(self.directory / self.names[path])}
            )
            spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kvstore}
            try:
                self._open[path] = ts.open(spec, open=True, read=True).result()
            except Exception as e:
                raise ConversionError(f"{self.directory}: cannot read {'/'.join(path)} ({e})") from None
        return self._open[path]

    def shape(self, path) -> tuple[int, ...]:
        return tuple(self._store(path).shape)

    def read(self, path: tuple[str, ...], layer: int | None = None) -> np.ndarray:
        store = self._store(path)
        return np.asarray((store if layer is None else store[layer]).read().result())


class ParamsWriter:
    """Write parameters tensor by tensor (stacked ones layer by layer) into a fresh folder."""

    def __init__(self, directory: str | Path):
        """directory: an empty folder to fill (outputs.atomic_output's, which commits it)."""
        self.directory = Path(directory).absolute()
        self.tree: dict[str, dict] = {}
        self._stores: dict[tuple[str, ...], ts.TensorStore] = {}

    def create(
        self, path: tuple[str, ...], shape: tuple[int, ...], dtype, layered: bool, chunks: tuple[int, ...] | None = None
    ) -> None:
        """chunks: the zarr chunk shape (default: whole array, one layer at a time for stacked arrays)."""
        chunks = list(chunks or shape)
        if layered:
            chunks[0] = 1
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(self.directory / ".".join(path))},
            "metadata": {
                "shape": list(shape),
                "chunks": chunks,
                "dtype": _zarr_dtype(dtype),
                "compressor": None,
                "fill_value": None,
                "order": "C",
            },
        }
        self._stores[path] = ts.open(spec, create=True, delete_existing=True).result()
        self.tree[str(path)] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in path],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
        }

    def write(self, path: tuple[str, ...], array: np.ndarray, layer: int | None = None) -> None:
        # Synchronous on purpose: overlapping the next tensor's read with this write raised peak RSS past the
        # two-tensor bound (two tensors in flight plus allocator fragmentation; docs/benchmarks.md).
        store = self._stores[path]
        store = store if layer is None else store[layer]
        store.write(array).result()

    def close(self, extra_files: dict[str, str] | None = None) -> Path:
        meta = {
            "tree_metadata": self.tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        (self.directory / "_METADATA").write_text(json.dumps(meta))
        for name, text in (extra_files or {}).items():
            (self.directory / name).write_text(text)
        self._stores.clear()
        return self.directory
