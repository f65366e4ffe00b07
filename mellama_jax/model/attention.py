"""Attention kernels: an XLA reference, `jax.nn.dot_product_attention`'s XLA path, cuDNN flash attention (GPU)
and splash attention (TPU).

All take q of shape (B, T, H, D) and k, v of shape (B, S, K, D) with H a multiple of K (grouped-query
attention without materialising repeated keys) and a boolean mask (B, T, S): True where a query may attend.
`cudnn` may instead get a `Packed` mask (see `build_mask`): the documents of each row as cuDNN's packed layout
(segment lengths and offsets), with the boolean mask beside it for rows that hold more documents than it has room
for. `splash` gets `Segments`: the segment ids themselves, which the kernel compares block by block.

`causal=True` says the mask is causal with queries and keys at the same positions (training, scoring), which
lets cuDNN and splash skip the masked half of the score matrix. Decoding against a KV cache runs
`cached_attention`, the same XLA reference on the cache's head-major layout: it is memory-bound, and its
one-token queries are not what the flash kernels are built for.
"""

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from mellama_jax.model import layers, rope

try:  # JAX's cuDNN attention, whose packed layout (documents as segment offsets) jax.nn does not expose
    from jax._src.cudnn import fused_attention_stablehlo as _cudnn_module
except ImportError:  # pragma: no cover - a JAX without it
    _cudnn_module = None


def make_mask(
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
    q_index: jnp.ndarray | None = None,
    kv_index: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Causal mask restricted to equal segment ids: packed documents never see each other.

    Segment id 0 marks padding; padding attends only to padding, so no row of the mask is empty
    (and no softmax produces NaN), while real tokens never attend to padding.
    """
    T, S = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
    q_index = jnp.arange(T) if q_index is None else q_index
    kv_index = jnp.arange(S) if kv_index is None else kv_index
    causal = q_index[..., :, None] >= kv_index[..., None, :]
    same_segment = q_segment_ids[..., :, None] == kv_segment_ids[..., None, :]
    return causal & same_segment


class Packed(NamedTuple):
    """The documents of each row as runs of equal segment ids, in cuDNN's packed layout: `lengths` (B, M) and
    start `offsets` (B, M + 1), -1 past a row's last run; `fits` says every row has at most M runs. `mask` is the
    boolean mask, for when one does not: built from the segment ids where it is used, so the usual packed path
    never computes or keeps it."""

    segment_ids: jax.Array
    lengths: jax.Array
    offsets: jax.Array
    fits: jax.Array

    @property
    def mask(self) -> jax.Array:
        return make_mask(self.segment_ids, self.segment_ids)


class Segments(NamedTuple):
    """The documents of each row as their segment ids (B, T), for splash attention; `mask` as for Packed."""

    segment_ids: jax.Array

    @property
    def mask(self) -> jax.Array:
        return make_mask(self.segment_ids, self.segment_ids)


def _run_index(segment_ids: jnp.ndarray) -> jnp.ndarray:
    new_run = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return jnp.cumsum(new_run, axis=1, dtype=jnp.int32) - 1


def documents_per_row(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """(B,): runs of equal segment ids per row (documents, and the padding at a row's end, as cudnn counts them
    against model.max_segments)."""
    return _run_index(segment_ids)[:, -1] + 1


def packed_layout(segment_ids: jnp.ndarray, max_segments: int) -> Packed:
    """Runs of equal ids (documents, and the padding at a row's end) as (lengths, offsets, fits)."""
    B, T = segment_ids.shape
    M = max_segments
    run = _run_index(segment_ids)  # (B, T): which run each token is in
    runs = run[:, -1] + 1
    lengths = jnp.sum(run[:, :, None] == jnp.arange(M, dtype=jnp.int32), axis=1, dtype=jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.cumsum(lengths, axis=1, dtype=jnp.int32)], axis=1)
    lengths = jnp.where(jnp.arange(M) < runs[:, None], lengths, -1)
    # starts only: JAX joins the rows' runs into one list and ends it with the batch's total length itself
    offsets = jnp.where(jnp.arange(M + 1) < runs[:, None], offsets, -1)
    return Packed(segment_ids, lengths, offsets, jnp.all(runs <= M))


def build_mask(segment_ids: jnp.ndarray, implementation: str, max_segments: int):
    """What `implementation` takes for causal attention over these documents: the packed layout for cudnn, the
    segment ids for splash, the boolean mask for the others."""
    name = resolve(implementation)
    if name == "cudnn":
        return packed_layout(segment_ids, max_segments)
    if name == "splash":
        return Segments(segment_ids)
    return make_mask(segment_ids, segment_ids)


def _softmax_attention(q, k, v, mask):
    """Head-major core: q (B, K, G, T, D) pre-scaled, k/v (B, K, S, D), mask (B, 1, 1, T, S) -> out (B, K, G, T, D)
    and the probabilities (B, K, G, T, S). Scores and softmax in fp32; products on the operands' dtype."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), probs


# Causal attention in blocks of at least this many queries, at most this many blocks (each block unrolled).
CAUSAL_BLOCK, MAX_CAUSAL_BLOCKS = 64, 8


def query_blocks(T: int, S: int, causal: bool, block: int = CAUSAL_BLOCK) -> tuple[tuple[int, int, int], ...]:
    """(start, end, keys) per block of queries: queries [start, end) read the first `keys` keys. Causal attention
    with queries and keys at the same positions splits the queries, so that a block reads only the keys up to its
    own last position, and the blocks above the diagonal of the score matrix are never computed (4 blocks: 3/8 of
    it, 8 blocks: 7/16). Otherwise one block."""
    if not causal or T != S or T < 2 * block:
        return ((0, T, S),)
    size = -(-T // min(T // block, MAX_CAUSAL_BLOCKS))
    return tuple((s, min(s + size, T), min(s + size, T)) for s in range(0, T, size))


def _blocked_attention(q, k, v, mask, blocks):
    """`_softmax_attention` over each block of queries and the keys it reads: out and the blocks' probabilities."""
    outs, probs = [], []
    for s, e, n in blocks:
        out, p = _softmax_attention(q[..., s:e, :], k[:, :, :n], v[:, :, :n], mask[..., s:e, :n])
        outs.append(out)
        probs.append(p)
    return jnp.concatenate(outs, axis=-2), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q, k, v, mask, blocks):
    return _blocked_attention(q, k, v, mask, blocks)[0]


def _attention_core_fwd(q, k, v, mask, blocks):
    out, probs = _blocked_attention(q, k, v, mask, blocks)
    return out, (q, k, v, out, probs)  # the mask is already in the probabilities


def _attention_core_bwd(blocks, residuals, d_out):
    """Softmax backward as flash attention writes it: dS = P * (dP - rowsum(dO * O)), a (T, D) reduction in place
    of a (T, S) one; every product a plain batched matmul (fused with the softmax backward, XLA's CPU matmuls ran
    slower: docs/benchmarks.md), on the operands' dtype with fp32 accumulation. Block by block as the forward ran;
    each block's key and value gradients cover the keys it read, zero-padded to all of them."""
    q, k, v, out, probs = residuals
    dtype = layers.gradient_operand_dtype(q.dtype)
    qc, kc, vc, d_out_c = (x.astype(dtype) for x in (q, k, v, d_out))
    f32 = jnp.float32
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    S = k.shape[2]

    def to_keys(scores, x, n):  # (.., t, n) x (.., t, D) -> (B, K, S, D), zero past the n keys read
        grad = jnp.einsum("bkgts,bkgtd->bksd", scores, x, preferred_element_type=f32)
        return jnp.pad(grad, ((0, 0), (0, 0), (0, S - n), (0, 0)))

    dq, dk, dv = [], [], []
    for (s, e, n), p in zip(blocks, probs, strict=True):
        d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out_c[..., s:e, :], vc[:, :, :n], preferred_element_type=f32)
        d_scores = (p * (d_probs - row[..., s:e, :])).astype(dtype)
        dq.append(jnp.einsum("bkgts,bksd->bkgtd", d_scores, kc[:, :, :n], preferred_element_type=f32))
        dk.append(to_keys(d_scores, qc[..., s:e, :], n))
        dv.append(to_keys(p.astype(dtype), d_out_c[..., s:e, :], n))
    dq, dk, dv = jnp.concatenate(dq, axis=-2), functools.reduce(jnp.add, dk), functools.reduce(jnp.add, dv)
    return dq.astype(out.dtype), dk.astype(out.dtype), dv.astype(out.dtype), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def _heads_first(q, K, rotary=None):
    """q (B, T, H, D) -> pre-scaled (B, K, G, T, D), rotated first by `rotary` = (cos, sin) (B, T, D) if given."""
    B, T, H, D = q.shape
    q = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    if rotary is not None:
        q = rope.rotate(q, rotary[0][:, None, None], rotary[1][:, None, None])
    return q * jnp.asarray(D**-0.5, q.dtype)


def _heads_last(out):
    """(B, K, G, T, D) -> (B, T, H, D)."""
    B, K, G, T, D = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def xla_attention(q, k, v, mask, causal=False, rotary=None):
    """The XLA reference; `causal` (queries and keys at the same positions) computes it in blocks of queries that
    skip the keys after them (`query_blocks`), with the same result. `rotary` (see `attend`) is applied in the
    head-major layout the products read, in the pass that transposes q and k anyway (applied before, on the
    projections' layout, it cost a CPU step more: docs/benchmarks.md)."""
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if rotary is not None:
        kh = rope.rotate(kh, rotary[0][:, None], rotary[1][:, None])
    blocks = query_blocks(q.shape[1], k.shape[1], causal, CAUSAL_BLOCK)
    return _heads_last(_attention_core(_heads_first(q, k.shape[2], rotary), kh, vh, mask[:, None, None], blocks))


def cached_attention(q, k, v, mask):
    """Decoding against a KV cache kept head-major: q (B, T, H, D), k/v (B, K, S, D), mask (B, T, S). In this
    layout a layer's keys and values feed the two matmuls as they lie; the sequence-major layout of the other
    kernels made XLA transpose the whole layer's cache for every token decoded (docs/benchmarks.md)."""
    return _heads_last(_softmax_attention(_heads_first(q, k.shape[1]), k, v, mask[:, None, None])[0])


def dot_product_attention(q, k, v, mask, causal=False):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def _cudnn_biased(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True, implementation="cudnn")


def _cudnn_packed(q, k, v, packed: Packed):
    return _cudnn_module.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=packed.lengths,
        kv_seqlen=packed.lengths,
        q_offsets=packed.offsets,
        kv_offsets=packed.offsets,
        scale=q.shape[-1] ** -0.5,
        mask_type=_cudnn_module.MaskType.PADDING_CAUSAL,
    )


def cudnn_attention(q, k, v, mask, causal=True):
    """cuDNN's fused flash attention (GPU, bf16/fp16), causal within each document.

    With a `Packed` mask, each row's documents go to cuDNN as its packed layout (segment lengths and offsets):
    causal attention within each, nothing across, and no mask to read. A batch with a row of more documents than
    the layout has room for (model.max_segments) takes the other branch of a `lax.cond`: the boolean mask as an
    additive bias (B, 1, T, S), which is exact for any number of documents but reads the bias and computes its
    gradient, which made the backward kernel twice as slow on an H100 (docs/benchmarks.md)."""
    if not isinstance(mask, Packed):
        return _cudnn_biased(q, k, v, mask)
    if _cudnn_module is None or not hasattr(_cudnn_module, "MaskType"):  # pragma: no cover - other JAX
        _warn_packed_fallback()
        return _cudnn_biased(q, k, v, mask.mask)
    return jax.lax.cond(mask.fits, _cudnn_packed, lambda q, k, v, m: _cudnn_biased(q, k, v, m.mask), q, k, v, mask)


@functools.cache
def _warn_packed_fallback() -> None:
    """Said once per process, loudly: the run stays exact but loses the packed kernel's speed."""
    warnings.warn(
        f"jax {jax.__version__} has no usable jax._src.cudnn.fused_attention_stablehlo (a private module "
        "that moved or changed): model.attention=cudnn falls back to the masked kernel, exact but about "
        "10% slower per step at 7B width. Pin jax as pyproject.toml does, or use cudnn_causal for "
        "unpacked data.",
        RuntimeWarning,
        stacklevel=3,
    )


def cudnn_causal_attention(q, k, v, mask, causal=True):
    """cuDNN flash attention with the causal mask alone: no bias, so the fastest, but packed documents see each
    other (as in transformers' Trainer on concatenated text): for unpacked data, or where that is acceptable."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


# The kernel's tiles are multiples of 128 tokens (its lane width): shorter or ragged rows are padded to one.
SPLASH_TILE = 128


def _splash_block(wanted: int, length: int) -> int:
    """The largest multiple of 128 that divides `length` (itself a multiple of 128) and is at most `wanted`."""
    tiles = length // SPLASH_TILE
    return SPLASH_TILE * max(
        n for n in range(1, tiles + 1) if tiles % n == 0 and n * SPLASH_TILE <= max(wanted, SPLASH_TILE)
    )


def _splash_kernel(heads: int, length: int, block_q: int, block_kv: int, interpret: bool):
    """A splash kernel for (heads, length, head_dim) queries: causal, with the same blocks forward and backward.

    Built for one device's shard (head_shards=1): under a mesh it runs inside a shard_map on local shapes. Built
    afresh in each trace (not cached): its block tables become arrays of the trace it is made in."""
    bq, bkv = _splash_block(block_q, length), _splash_block(block_kv, length)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, segment_ids, blocks: tuple[int, int], interpret: bool):
    """One shard: q (B, T, H, D) pre-scaled, k/v (B, T, K, D), segment_ids (B, T) -> (B, T, H, D).

    The kernel takes one row at a time, head-major, and K/V with fewer heads than q as they are (query head h
    reads key/value head h // (H / K)), so grouped-query heads are never repeated. A ragged length is padded with
    segment id -1: the padding sees only itself and is dropped from the output."""
    B, T, H, D = q.shape
    pad = -T % SPLASH_TILE
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    kernel = _splash_kernel(H, T + pad, *blocks, interpret)
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = jax.vmap(kernel)(qh, kh, vh, splash.SegmentIds(q=segment_ids, kv=segment_ids))
    return out.transpose(0, 2, 1, 3)[:, :T]


def _logical_spec(axes: tuple) -> PartitionSpec:
    """Mesh axes of logical `axes` by the rule table in context (none: replicated), for a shard_map's specs."""
    return nn.logical_to_mesh_axes(axes)


def splash_attention(q, k, v, mask, causal=True, blocks: tuple[int, int] = (512, 512)):
    """Splash attention (TPU Pallas flash attention, its own backward): causal within each document, the documents
    apart by their segment ids, grouped-query heads without repeating K/V. Off TPU (tests, the CPU reference) the
    same kernel runs in Pallas's interpreter. `blocks`: (query, key/value) block sizes, model.splash_block_*.

    Under a mesh the kernel runs per shard in a `shard_map` over the batch and head axes (the rule table's
    mapping of activation_batch / activation_heads / activation_kv_heads); the sequence stays whole on every
    device. check_vma=False: Pallas calls do not declare how their outputs vary over mesh axes. A boolean mask
    (no segment ids) runs the XLA reference."""
    if not isinstance(mask, (Segments, Packed)):
        return xla_attention(q, k, v, mask)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    local = functools.partial(_splash_local, blocks=tuple(blocks), interpret=layers.target_platform() != "tpu")
    if jax.sharding.get_abstract_mesh().empty:
        return local(q, k, v, mask.segment_ids)
    q_spec = _logical_spec(("activation_batch", None, "activation_heads", None))
    kv_spec = _logical_spec(("activation_batch", None, "activation_kv_heads", None))
    seg_spec = _logical_spec(("activation_batch", None))
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)(
        q, k, v, mask.segment_ids
    )


IMPLEMENTATIONS = {
    "xla": xla_attention,
    "dot_product": dot_product_attention,
    "cudnn": cudnn_attention,
    "cudnn_causal": cudnn_causal_attention,
    "splash": splash_attention,
}
# Kernels that assume queries and keys at the same positions; a caller with causal=False gets the reference.
CAUSAL_ONLY = ("cudnn", "cudnn_causal", "splash")


def resolve(implementation: str) -> str:
    """'auto': cuDNN flash attention on GPUs, splash attention on TPUs (both segment-aware), the XLA reference
    elsewhere."""
    if implementation == "auto":
        return {"gpu": "cudnn", "tpu": "splash"}.get(layers.target_platform(), "xla")
    return implementation


def attend(
    q, k, v, mask, implementation: str = "xla", causal: bool = False, blocks: tuple[int, int] = (512, 512), rotary=None
):
    """`blocks`: splash's (query, key/value) block sizes; the other implementations ignore them. `rotary`:
    (cos, sin) of shape (B, T, D) when q and k still need their rotary embedding (queries and keys at the same
    positions); the XLA reference applies it in its own layout, the others get rotated q and k."""
    name = resolve(implementation)
    if name in CAUSAL_ONLY and not causal:
        name = "xla"
    if isinstance(mask, (Packed, Segments)) and name not in ("cudnn", "splash"):
        mask = mask.mask
    if rotary is not None and rotary[0].shape != q.shape[:2] + q.shape[-1:]:
        raise ValueError(
            f"rotary cos/sin must be (batch, length, head_dim) = {q.shape[:2] + q.shape[-1:]}, got {rotary[0].shape}"
        )
    if name == "xla":
        return xla_attention(q, k, v, mask, causal, rotary)
    if rotary is not None:
        q, k = rope.apply(q, *rotary), rope.apply(k, *rotary)
    if name == "splash":
        return splash_attention(q, k, v, mask, causal, blocks)
    return IMPLEMENTATIONS[name](q, k, v, mask, causal)
