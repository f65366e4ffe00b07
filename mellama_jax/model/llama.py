"""LLaMA2: pre-norm decoder layers (GQA attention + SwiGLU), stacked and run with one `lax.scan` (or one after
another, unrolled: model.scan_layers=false).

Parameter logical axes (the rule table in the config maps them to mesh axes):
  embed.embedding (vocab, embed)            lm_head.kernel (embed, vocab)
  layers.attn.wq  (layers, embed, heads, head_dim)     wk/wv (layers, embed, kv_heads, head_dim)
  layers.attn.wo  (layers, heads, head_dim, embed)
  layers.mlp.w_gate/w_up (layers, embed, mlp)          w_down (layers, mlp, embed)
  *.scale (layers?, norm)
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mellama_jax.config import LORA_TARGETS, LoraConfig, ModelConfig
from mellama_jax.model import attention, rope
from mellama_jax.model.layers import Dense, Embed, RMSNorm, constrain, swiglu

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
# Inside a layer and for the head, activations are flat (B*T, D) rows: XLA's CPU backend runs the projections
# and their gradients faster on 2-D operands than on (B, T, D) (measured: docs/benchmarks.md); on GPU/TPU the
# reshape is free.
FLAT_EMBED = ("activation_batch", "activation_embed")


def _dtypes(cfg: ModelConfig):
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _dense_kw(cfg: ModelConfig, lora: LoraConfig | None, name: str, rngs: nnx.Rngs) -> dict:
    kw = dict(**_dtypes(cfg), init_std=cfg.initializer_range, rngs=rngs)
    if lora is not None and name in lora.targets:
        kw.update(
            lora_rank=lora.rank, lora_scale=lora.scale, lora_dropout=lora.dropout, lora_id=LORA_TARGETS.index(name)
        )
    return kw


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, *, rngs: nnx.Rngs):
        D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = Dense((D,), (H, Dh), ("embed", "heads", "head_dim"), **_dense_kw(cfg, lora, "wq", rngs))
        self.wk = Dense((D,), (K, Dh), ("embed", "kv_heads", "head_dim"), **_dense_kw(cfg, lora, "wk", rngs))
        self.wv = Dense((D,), (K, Dh), ("embed", "kv_heads", "head_dim"), **_dense_kw(cfg, lora, "wv", rngs))
        self.wo = Dense((H, Dh), (D,), ("heads", "head_dim", "embed"), **_dense_kw(cfg, lora, "wo", rngs))
        self.implementation = cfg.attention
        self.splash_blocks = (cfg.splash_block_q, cfg.splash_block_kv)

    def _qkv(self, x, batch_length, rng):
        """The projections (B, T, heads, head_dim), before their rotary embedding."""
        q = checkpoint_name(self.wq(x, dropout_rng=rng), "query_proj").reshape(
            *batch_length, *self.wq.kernel.shape[-2:]
        )
        k = checkpoint_name(self.wk(x, dropout_rng=rng), "key_proj").reshape(*batch_length, *self.wk.kernel.shape[-2:])
        v = checkpoint_name(self.wv(x, dropout_rng=rng), "value_proj").reshape(
            *batch_length, *self.wv.kernel.shape[-2:]
        )
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        return q, k, v

    def __call__(self, x, batch_length, cos, sin, mask, rng=None):
        """Training and scoring: x flat (B*T, D) with batch_length = (B, T); returns (B*T, D)."""
        q, k, v = self._qkv(x, batch_length, rng)
        out = attention.attend(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask,
            self.implementation,
            True,
            self.splash_blocks,
            rotary=(cos, sin),
        )
        out = checkpoint_name(out, "attention_out")
        return self.wo(out.reshape(-1, *out.shape[2:]), dropout_rng=rng)

    def decode(self, x, batch_length, cos, sin, mask, cache):
        """Decoding: cache = (k, v, index) with k, v this layer's cache (B, K, S, Dh), head-major. The new keys
        and values are written at [:, :, index] (in place: only the new tokens) and the queries attend over the
        whole cache, masked by `mask` (B, T, S). Returns (output, (k, v))."""
        q, k, v = self._qkv(x, batch_length, None)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        k_cache, v_cache, index = cache
        start = (jnp.int32(0), jnp.int32(0), index, jnp.int32(0))
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), start)
        out = attention.cached_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
        return self.wo(out.reshape(-1, *out.shape[2:])), (k_cache, v_cache)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.w_gate = Dense((D,), (F,), ("embed", "mlp"), **_dense_kw(cfg, lora, "w_gate", rngs))
        self.w_up = Dense((D,), (F,), ("embed", "mlp"), **_dense_kw(cfg, lora, "w_up", rngs))
        self.w_down = Dense((F,), (D,), ("mlp", "embed"), **_dense_kw(cfg, lora, "w_down", rngs))

    def __call__(self, x, rng=None):
        h = swiglu(self.w_gate(x, dropout_rng=rng), self.w_up(x, dropout_rng=rng))
        h = constrain(h, ("activation_batch", "activation_mlp"))
        return self.w_down(h, dropout_rng=rng)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **_dtypes(cfg))
        self.attn = Attention(cfg, lora, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **_dtypes(cfg))
        self.mlp = MLP(cfg, lora, rngs=rngs)

    def _mlp_block(self, x, attn, shape, rng):
        h = constrain(x + attn, FLAT_EMBED)
        out = constrain(h + self.mlp(self.mlp_norm(h), rng), FLAT_EMBED).reshape(shape)
        return constrain(out, BATCH_LENGTH_EMBED)

    def __call__(self, x, cos, sin, mask, rng=None):
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # flat rows (batch-major, so batch sharding carries over)
        return self._mlp_block(x, self.attn(self.attn_norm(x), (B, T), cos, sin, mask, rng), (B, T, D), rng)

    def decode(self, x, cos, sin, mask, cache):
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        attn, new_cache = self.attn.decode(self.attn_norm(x), (B, T), cos, sin, mask, cache)
        return self._mlp_block(x, attn, (B, T, D), None), new_cache


_POLICIES = jax.checkpoint_policies
# What each layer keeps for the backward pass: "none" everything, "full" only its input (the forward runs again),
# "dots" every projection's output, "qkv_proj" attention's projections and output, "offload" every projection's
# output copied to the host's memory and back (no recompute of the projections at about "full"'s device memory,
# for the price of the host link; TPU and GPU compiles; XLA's CPU backend keeps them on the device).
# Projections are custom-VJP matmuls (layers.matmul) that the dot policies cannot see inside: their outputs are
# named "dense" and saved by name.
REMAT = {
    "none": None,
    "full": _POLICIES.nothing_saveable,
    "dots": _POLICIES.save_from_both_policies(_POLICIES.checkpoint_dots, _POLICIES.save_only_these_names("dense")),
    "dots_no_batch": _POLICIES.save_from_both_policies(
        _POLICIES.dots_with_no_batch_dims_saveable, _POLICIES.save_only_these_names("dense")
    ),
    "qkv_proj": _POLICIES.save_only_these_names("query_proj", "key_proj", "value_proj", "attention_out"),
    "offload": _POLICIES.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=("dense",),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def _layer_slice(stacked, i: int):
    """Layer i's part of a tree of per-layer stacked arrays (a static slice)."""
    return jax.tree.map(lambda x: x[i], stacked)


def _stacked_layers(cfg: ModelConfig, lora: LoraConfig | None, rngs: nnx.Rngs) -> DecoderLayer:
    """cfg.num_layers layers as one module whose parameters carry a leading 'layers' axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return DecoderLayer(cfg, lora, rngs=rngs)

    return make(rngs)


class Llama(nnx.Module):
    """LLaMA2; with `lora`, the targeted projections also carry LoRA adapters (nnx.LoRAParam)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        cfg.validate()
        if lora is not None:
            lora.validate()
        self.cfg = cfg
        kw = _dtypes(cfg)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, **kw, init_std=cfg.initializer_range, rngs=rngs)
        self.layers = _stacked_layers(cfg, lora, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.lm_head = Dense(
            (cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"), **kw, init_std=cfg.initializer_range, rngs=rngs
        )

    def _inputs(self, tokens, positions, segment_ids, decoding: bool = False):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        cos, sin = rope.cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        h = self.embed.lookup(tokens) if decoding else self.embed(tokens)
        return segment_ids, cos, sin, constrain(h, BATCH_LENGTH_EMBED)

    def hidden_states(self, tokens, positions=None, segment_ids=None, dropout_rng=None):
        """Training and scoring: final-norm hidden states (B, T, D) for token ids (B, T).

        positions: (B, T) int, restart at 0 for each packed document (default 0..T-1).
        segment_ids: (B, T) int, one id per packed document, 0 for padding (default all 1).
        dropout_rng: a key for LoRA dropout (training only); each layer folds in its index.
        """
        cfg = self.cfg
        segment_ids, cos, sin, h = self._inputs(tokens, positions, segment_ids)
        mask = attention.build_mask(segment_ids, cfg.attention, cfg.max_segments)
        graphdef, state = nnx.split(self.layers)

        def body(h, xs):
            layer_state, index = xs
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
            return nnx.merge(graphdef, layer_state)(h, cos, sin, mask, rng), None

        policy = REMAT[cfg.remat]
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        xs = (state, jnp.arange(cfg.num_layers, dtype=jnp.int32))
        if cfg.scan_layers:
            h, _ = jax.lax.scan(body, h, xs, unroll=cfg.scan_unroll)
        else:
            for i in range(cfg.num_layers):
                h, _ = body(h, _layer_slice(xs, i))
        return self.norm(h)

    def layer_outputs(self, tokens) -> list[jax.Array]:
        """The residual stream (B, T, D) after the embedding and after each layer, the layers run one at a time:
        for comparing with another implementation layer by layer (`convert verify`)."""
        segment_ids, cos, sin, h = self._inputs(tokens, None, None)
        mask = attention.build_mask(segment_ids, self.cfg.attention, self.cfg.max_segments)
        graphdef, state = nnx.split(self.layers)
        stream = [h]
        for i in range(self.cfg.num_layers):
            stream.append(nnx.merge(graphdef, _layer_slice(state, i))(stream[-1], cos, sin, mask))
        return stream

    def unstacked_layers(self, consume: bool = False) -> list[DecoderLayer]:
        """The layers as separate modules, each holding its own slice of the stacked parameters (a copy).
        Decoding runs them one after another, unrolled, as MaxText's inference does (scan_layers=False): a
        scanned decoder slices, and so copies, every layer's weights again for every token it decodes.

        consume=True frees each stacked weight once its slices exist, so this peaks at the model plus its largest
        stacked weight instead of holding every layer twice; this model's layers are unusable afterwards."""
        graphdef, state = nnx.split(self.layers)
        leaves, treedef = jax.tree.flatten(state)
        slices = [[] for _ in range(self.cfg.num_layers)]
        for stacked in leaves:
            for i, layer in enumerate(slices):
                layer.append(stacked[i])
            if consume and isinstance(stacked, jax.Array):  # (a host numpy array is the caller's)
                stacked.delete()
        return [nnx.merge(graphdef, jax.tree.unflatten(treedef, layer)) for layer in slices]

    def decode_hidden_states(self, tokens, cache, layers, positions=None, segment_ids=None):
        """Decoding: the tokens (B, T) are written into `cache` (from `init_cache`) at cache["index"], attending
        over everything cached before them; `layers` are `unstacked_layers()`, made once per loaded model
        (`generate.decoder`), not per call or token. Returns (final-norm hidden states (B, T, D), the updated cache)."""
        segment_ids, cos, sin, h = self._inputs(tokens, positions, segment_ids, decoding=True)
        index, T = cache["index"], tokens.shape[-1]
        kv_segments = jax.lax.dynamic_update_slice_in_dim(
            cache["segment_ids"], segment_ids.astype(cache["segment_ids"].dtype), index, axis=1
        )
        mask = attention.make_mask(
            segment_ids, kv_segments, q_index=index + jnp.arange(T), kv_index=jnp.arange(kv_segments.shape[-1])
        )
        keys, values = [], []
        for layer, k, v in zip(layers, cache["k"], cache["v"], strict=True):
            h, (k, v) = layer.decode(h, cos, sin, mask, (k, v, index))
            keys.append(k)
            values.append(v)
        return self.norm(h), dict(k=keys, v=values, segment_ids=kv_segments, index=index + T)

    def __call__(self, tokens, positions=None, segment_ids=None, dropout_rng=None):
        """Logits (B, T, vocab) in float32."""
        h = self.hidden_states(tokens, positions, segment_ids, dropout_rng)
        B, T, D = h.shape
        logits = self.lm_head(constrain(h.reshape(B * T, D), FLAT_EMBED), out_dtype=jnp.float32).reshape(B, T, -1)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache for `length` positions: keys and values per layer (B, K, S, Dh; head-major for
    cached_attention, one buffer per layer like the unstacked layers), segment ids (0 = empty), write index."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        "segment_ids": jnp.zeros((batch, length), jnp.int32),
        "index": jnp.int32(0),
    }


def init_abstract(cfg: ModelConfig, lora: LoraConfig | None = None) -> Llama:
    """The model with ShapeDtypeStructs in place of arrays: nothing is allocated, whatever its size."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), lora=lora))


def count_params(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(int(x.size) for x in jax.tree.leaves(state))
