"""A model to decode with (`eval`, `generate`): checked to fit the devices, restored straight into the decoding
mesh in the asked dtype (`model/loading.py`), laid out for the KV-cache decoder; and each prompt fitted into
the model's positions as the authors' harness did.

Memory per device, counted before anything loads (the arithmetic of `info`: each array's shard under the rule
table): the parameters; the largest stacked layer weight once more, which `decoder(consume=True)` holds while it
slices that weight into per-layer copies; and the KV cache for the batch, as long as `generate` makes it for the
longest prompt that fits (its padded width bucket plus the new tokens: `cache_length`). Activations are not
counted (with flash attention they are small beside these).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import AbstractMesh

from mellama_jax import generate
from mellama_jax.artifacts import find_model_config
from mellama_jax.config import ConfigError, LoraConfig, MeshConfig, ModelConfig
from mellama_jax.generate import bucket, decoder
from mellama_jax.model import init_abstract
from mellama_jax.model.loading import load_model
from mellama_jax.sharding import _resolve, bytes_per_device, make_mesh, parse_layout, state_shardings

GiB = 1024**3
AXES = ("data", "fsdp", "tensor")
DTYPES = ("bfloat16", "float32")


def layout_of(text: str | None, devices: int | None = None) -> dict[str, int]:
    """ "tensor=4" -> {"data": 1, "fsdp": 1, "tensor": 4}; None -> one device. An axis of -1 takes the rest of
    `devices`."""
    layout = {axis: 1 for axis in AXES}
    layout.update(parse_layout(text) if text else {})
    unknown = sorted(set(layout) - set(AXES))
    if unknown:
        raise ConfigError(f"--mesh {text}: unknown axis {unknown[0]} (decoding meshes use {', '.join(AXES)})")
    if any(v < 1 and v != -1 for v in layout.values()) or list(layout.values()).count(-1) > 1:
        raise ConfigError(f"--mesh {text}: axis sizes must be positive (or one of them -1: the rest)")
    if -1 in layout.values():
        if devices is None:
            raise ConfigError(f"--mesh {text}: -1 needs the device count")
        layout = _resolve(layout, devices, "ici")
    return layout


def layout_text(layout: dict[str, int]) -> str:
    return ",".join(f"{axis}={layout[axis]}" for axis in AXES if layout.get(axis, 1) > 1) or "one device"


def decoding_bytes(
    cfg: ModelConfig, lora: LoraConfig | None, dtype: str, layout: dict[str, int], rules, batch: int, length: int
) -> int:
    """Bytes per device of decoding `batch` rows of `length` positions on `layout` (see the module's note). Raises
    ConfigError when a dimension does not divide over the layout."""
    cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)
    abstract = nnx.state(init_abstract(cfg, lora), nnx.Param)
    mesh = AbstractMesh(tuple(layout[a] for a in AXES), AXES)
    shardings = state_shardings(abstract, mesh, rules)
    params = bytes_per_device(abstract, shardings)
    slicing = max(
        bytes_per_device(leaf, shard)
        for leaf, shard in zip(jax.tree.leaves(abstract["layers"]), jax.tree.leaves(shardings["layers"]))
    )
    itemsize = 2 if dtype == "bfloat16" else 4
    rows = math.ceil(batch / (layout["data"] * layout["fsdp"]))
    kv_heads = math.ceil(cfg.num_kv_heads / layout["tensor"])
    cache = 2 * cfg.num_layers * rows * length * kv_heads * cfg.head_dim * itemsize
    return params + slicing + cache


def _candidates(devices: int):
    """Layouts using all `devices`, least model parallelism first (tensor before fsdp; the rest data)."""
    powers = [2**i for i in range(int(math.log2(devices)) + 1) if devices % 2**i == 0]
    found = [
        {"data": devices // (t * f), "fsdp": f, "tensor": t} for t in powers for f in powers if devices % (t * f) == 0
    ]
    return sorted(found, key=lambda lay: (lay["tensor"] * lay["fsdp"], lay["fsdp"]))


def check_fits(
    cfg: ModelConfig,
    lora: LoraConfig | None,
    dtype: str,
    layout: dict[str, int],
    rules,
    batch: int,
    length: int,
    device_bytes: int | None,
    devices: int,
) -> None:
    """Refuse, in one line naming a `--mesh` that fits, a layout whose devices are too small for the model.
    `device_bytes` None (CPU: no limit reported): nothing to check."""
    if device_bytes is None:
        return
    need = decoding_bytes(cfg, lora, dtype, layout, rules, batch, length)
    if need <= device_bytes:
        return
    head = (
        f"{cfg.name} in {dtype} needs {need / GiB:.1f} GiB per device on {layout_text(layout)} (parameters, "
        f"KV cache for {batch} x {length} positions), a device has {device_bytes / GiB:.1f} GiB"
    )
    least = None  # the candidate needing the least memory, for the message when none fits
    for candidate in _candidates(devices):
        try:
            fits = decoding_bytes(cfg, lora, dtype, candidate, rules, batch, length)
        except ConfigError:  # a dimension that does not divide over this layout
            continue
        if fits <= device_bytes:
            raise ConfigError(f"{head}: pass --mesh {layout_text(candidate)} ({fits / GiB:.1f} GiB per device)")
        least = min(least or (candidate, fits), (candidate, fits), key=lambda c: c[1])
    best = f" (--mesh {layout_text(least[0])} needs {least[1] / GiB:.1f} GiB)" if least else ""
    raise ConfigError(
        f"{head}: it does not fit the {devices} devices here{best}; use more devices, a smaller "
        "--batch-size, or --dtype bfloat16"
    )


def device_memory() -> int | None:
    """What XLA may allocate on one device (None on CPU, which reports no limit)."""
    stats = jax.local_devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


@dataclasses.dataclass
class DecodingModel:
    """A loaded model ready for `generate`: its decoder, config, and mesh (None: one device)."""

    decoder: object
    cfg: ModelConfig
    mesh: object
    rules: tuple | None

    def generate(
        self,
        ids: list[list[int]],
        max_new_tokens: int,
        eos_id: int | None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        return generate.generate(
            self.decoder, ids, max_new_tokens, eos_id, temperature, top_p, seed, self.mesh, self.rules
        )


def cache_length(positions: int, max_new_tokens: int) -> int:
    """The longest KV cache `generate` makes: a prompt cut to the room left (`fit_prompt`), padded to its width
    bucket, plus the new tokens."""
    return bucket(max(positions - max_new_tokens, 1)) + max_new_tokens


def load_for_decoding(
    params: str | Path,
    adapters: str | Path | None = None,
    dtype: str = "bfloat16",
    mesh: str | None = None,
    batch: int = 1,
    max_new_tokens: int = 256,
) -> DecodingModel:
    """The model of `params` (and `adapters`) in `dtype` on the layout `mesh` ("data=2,tensor=4"; None: this
    host's first device), after checking it fits there (`check_fits`) for `batch` rows of `max_new_tokens`."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    cfg = find_model_config(params)[0]
    lora = find_model_config(adapters)[1] if adapters else None
    layout = layout_of(mesh, len(jax.devices()))
    rules = MeshConfig().rules
    check_fits(
        cfg,
        lora,
        dtype,
        layout,
        rules,
        batch,
        cache_length(cfg.max_seq_len, max_new_tokens),
        device_memory(),
        len(jax.devices()),
    )
    placed = make_mesh(MeshConfig(ici=layout), jax.devices()) if mesh else None
    model = load_model(params, adapters, cfg, dtype, placed, rules)
    return DecodingModel(decoder(model, consume=True), model.cfg, placed, rules if placed is not None else None)


def fit_prompt(ids: list[int], positions: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """`ids` (BOS first) kept within the positions left for it after `max_new_tokens`, and whether it was cut.

    The authors' harness (BIDS-Xu-Lab/medical-evaluation, lm_eval/base.py:447 and lm_eval/models/huggingface.py:877)
    keeps the last `max_length - max_gen_toks` tokens of an over-long context. It encodes without BOS
    (huggingface.py:382-391); our prompts start with the BOS the model was trained with, so an over-long prompt
    keeps BOS and then the last `positions - max_new_tokens - 1` tokens: the same number of positions."""
    room = positions - max_new_tokens
    if room < 2:
        raise ConfigError(
            f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's {positions} positions"
        )
    if len(ids) <= room:
        return list(ids), False
    return [ids[0], *ids[len(ids) - (room - 1) :]], True
