"""Attention implementations agree; packed documents are isolated; positions restart per document."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import skip_unless_ci
from flax import nnx

from mellama_jax.config import load_model_preset
from mellama_jax.model import Llama, attention


def test_xla_and_dot_product_attention_agree(rng):
    B, T, H, K, D = 2, 24, 8, 2, 16
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 9 + [0] * 5], B, axis=0))
    mask = attention.make_mask(seg, seg)
    a = attention.attend(q, k, v, mask, "xla")
    b = attention.attend(q, k, v, mask, "dot_product")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_reference_attention_gradients_match_autodiff(rng):
    """The reference's hand-written backward (flash-style softmax gradient) against JAX's autodiff of
    jax.nn.dot_product_attention, with grouped-query heads and packed documents."""
    import jax

    B, T, H, K, D = 2, 20, 8, 2, 16
    q, g = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1] * 8 + [2] * 9 + [0] * 3], B, axis=0))
    mask = attention.make_mask(seg, seg)

    def grads(impl):
        return jax.grad(lambda q, k, v: jnp.sum(attention.attend(q, k, v, mask, impl) * g), argnums=(0, 1, 2))(q, k, v)

    for ours, ref in zip(grads("xla"), grads("dot_product")):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-4)


def test_causal_query_blocks_match_the_whole_matrix(rng, monkeypatch):
    """Causal attention in blocks of queries (each reading only the keys up to its last position): output and
    gradients equal jax.nn.dot_product_attention's autodiff, with grouped-query heads, packed documents, padding
    and a last block shorter than the others."""
    assert attention.query_blocks(256, 256, True) == ((0, 64, 64), (64, 128, 128), (128, 192, 192), (192, 256, 256))
    assert len(attention.query_blocks(4096, 4096, True)) == 8  # blocks of 512: at most 8, each unrolled
    assert attention.query_blocks(100, 100, True) == ((0, 100, 100),)  # shorter than two blocks: one
    assert attention.query_blocks(256, 300, True) == ((0, 256, 300),)  # queries not at the keys' positions
    assert attention.query_blocks(256, 256, False) == ((0, 256, 256),)
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 8)
    B, T, H, K, D = 2, 50, 8, 2, 16
    assert [b[:2] for b in attention.query_blocks(T, T, True, 8)] == [
        (0, 9),
        (9, 18),
        (18, 27),
        (27, 36),
        (36, 45),
        (45, 50),
    ]
    q, g = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 25 + [0] * 5], B, axis=0))
    mask = attention.make_mask(seg, seg)

    def value_and_grads(impl, causal):
        loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, mask, impl, causal=causal) * g)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    value, grads = value_and_grads("xla", True)
    ref_value, ref_grads = value_and_grads("dot_product", False)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for ours, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-4)


def test_rotary_inside_the_reference_equals_rotating_first(rng, monkeypatch):
    """`attend(..., rotary=(cos, sin))`: the XLA reference rotates q and k in its head-major layout (in query
    blocks); output and gradients equal jax.nn.dot_product_attention's autodiff on q and k rotated first by
    rope.apply (which test_parity checks against transformers), with GQA, documents restarting their positions."""
    from mellama_jax.model import rope

    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 8)
    B, T, H, K, D = 2, 24, 4, 2, 16
    q, g = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], B, axis=0))
    positions = jnp.asarray(np.repeat([list(range(10)) + list(range(14))], B, axis=0))
    cos, sin = rope.cos_sin(positions, D, 10000.0)
    mask = attention.make_mask(seg, seg)
    assert len(attention.query_blocks(T, T, True, 8)) == 3

    def value_and_grads(f):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)

    value, grads = value_and_grads(lambda q, k, v: attention.attend(q, k, v, mask, "xla", True, rotary=(cos, sin)))
    ref_value, ref_grads = value_and_grads(
        lambda q, k, v: attention.attend(rope.apply(q, cos, sin), rope.apply(k, cos, sin), v, mask, "dot_product")
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for ours, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-4)
    # the other kernels get q and k rotated before them
    other = attention.attend(q, k, v, mask, "dot_product", True, rotary=(cos, sin))
    np.testing.assert_allclose(
        np.asarray(other),
        np.asarray(attention.attend(rope.apply(q, cos, sin), rope.apply(k, cos, sin), v, mask, "dot_product")),
        atol=1e-6,
    )


def test_reference_attention_by_hand(rng):
    """One query row against a hand-written softmax over the keys it may see."""
    T, D = 6, 4
    q = rng.normal(size=(1, T, 1, D)).astype(np.float32)
    k = rng.normal(size=(1, T, 1, D)).astype(np.float32)
    v = rng.normal(size=(1, T, 1, D)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2]])
    out = np.asarray(
        attention.attend(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), attention.make_mask(jnp.asarray(seg), jnp.asarray(seg))
        )
    )
    t = 4  # sees keys 3 and 4 only: same document, not the future
    s = np.array([q[0, t, 0] @ k[0, j, 0] / np.sqrt(D) for j in (3, 4)])
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(out[0, t, 0], p[0] * v[0, 3, 0] + p[1] * v[0, 4, 0], atol=1e-6)


def test_packed_documents_match_separate_runs(rng):
    for impl in ("xla", "dot_product"):
        cfg = dataclasses.replace(load_model_preset("tiny-gqa"), attention=impl)
        model = Llama(cfg, rngs=nnx.Rngs(3))
        doc_a = rng.integers(3, cfg.vocab_size, 9)
        doc_b = rng.integers(3, cfg.vocab_size, 6)
        packed = np.concatenate([doc_a, doc_b, [0, 0]])[None]
        seg = np.array([[1] * 9 + [2] * 6 + [0] * 2])
        pos = np.array([list(range(9)) + list(range(6)) + [0, 0]])
        got = np.asarray(model(jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg)))
        alone_a = np.asarray(model(jnp.asarray(doc_a[None])))
        alone_b = np.asarray(model(jnp.asarray(doc_b[None])))
        np.testing.assert_allclose(got[0, :9], alone_a[0], atol=1e-5)
        np.testing.assert_allclose(got[0, 9:15], alone_b[0], atol=1e-5)


def test_model_attention_implementations_agree(rng):
    base = load_model_preset("tiny-gqa")
    ids = jnp.asarray(rng.integers(3, base.vocab_size, (2, 20)))
    outs = []
    for impl in ("xla", "dot_product"):
        model = Llama(dataclasses.replace(base, attention=impl), rngs=nnx.Rngs(0))
        outs.append(np.asarray(model(ids)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_bf16_compute_stays_close_to_fp32(rng):
    base = load_model_preset("tiny")
    ids = jnp.asarray(rng.integers(3, base.vocab_size, (2, 16)))
    ref = Llama(base, rngs=nnx.Rngs(0))
    low = Llama(dataclasses.replace(base, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert low.layers.attn.wq.kernel[...].dtype == jnp.float32  # parameters stay fp32
    a, b = np.asarray(ref(ids)), np.asarray(low(ids))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.05
    assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) > 0.9


def test_attention_choices_resolve_and_decoding_keeps_the_reference(rng):
    """'auto' is the XLA reference off GPUs; a model configured for cuDNN decodes (KV cache, not causal-aligned)
    through the reference on any backend, so its tokens equal the xla model's."""
    from mellama_jax.config import ConfigError
    from mellama_jax.generate import generate

    assert attention.resolve("auto") == "xla"  # tests run on CPU
    base = load_model_preset("tiny-gqa")
    for impl in ("cudnn", "cudnn_causal", "auto"):
        dataclasses.replace(base, attention=impl).validate()
    with pytest.raises(ConfigError, match="attention must be one of"):
        dataclasses.replace(base, attention="flash").validate()
    prompts = [list(rng.integers(3, base.vocab_size, n)) for n in (5, 9)]
    ref = generate(Llama(base, rngs=nnx.Rngs(1)), prompts, 6)
    got = generate(Llama(dataclasses.replace(base, attention="cudnn"), rngs=nnx.Rngs(1)), prompts, 6)
    np.testing.assert_array_equal(got, ref)


def test_bench_attention_reports_errors_against_the_reference():
    from mellama_jax.bench.attention import AttentionBenchRequest, bench_attention

    result = bench_attention(
        AttentionBenchRequest(
            ("xla", "dot_product", "cudnn"),
            batch=1,
            seq=32,
            heads=4,
            kv_heads=2,
            head_dim=16,
            dtype="float32",
            docs=2,
            steps=1,
        )
    )
    xla, dot, cudnn = result["rows"]
    assert xla["rel_err_dq"] == 0 and dot["rel_err_dk"] < 1e-5 and dot["fwd_bwd_ms"] > 0
    assert "cuDNN" in cudnn["error"]  # no GPU here: reported as a row, not raised


def test_packed_layout_by_hand(rng):
    """cuDNN's packed layout from segment ids: runs of equal ids (documents, and the padding at a row's end),
    lengths and start offsets, -1 past the last run (the convention of JAX's cuDNN attention, whose own
    example is offsets [[0, 1, 2, -1], [0, 1, -1, -1]] for rows of 3 and 2 one-token segments), and `fits`
    false once a row has more runs than room. The mask the layout describes (causal within each run) is the
    boolean mask."""
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    packed = attention.packed_layout(seg, 4)
    np.testing.assert_array_equal(packed.lengths, [[3, 2, 1, 2], [8, -1, -1, -1]])
    np.testing.assert_array_equal(packed.offsets, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1]])
    assert bool(packed.fits)
    assert not bool(attention.packed_layout(seg, 3).fits)
    np.testing.assert_array_equal(packed.mask, attention.make_mask(seg, seg))

    seg = np.cumsum(rng.random((3, 64)) < 0.1, axis=1) + 1
    seg[0, 50:] = 0  # a padded row
    packed = attention.packed_layout(jnp.asarray(seg), 16)
    for b in range(3):
        runs = [r for r in packed.lengths[b] if r >= 0]
        starts = [o for o in packed.offsets[b] if o >= 0]
        assert sum(runs) == 64 and starts == list(np.cumsum([0] + runs[:-1]))
        run_of = np.repeat(np.arange(len(runs)), runs)
        described = (run_of[:, None] == run_of[None, :]) & np.tri(64, dtype=bool)
        np.testing.assert_array_equal(described, packed.mask[b])
    for name, kind in (("cudnn", attention.Packed), ("xla", jax.Array), ("cudnn_causal", jax.Array)):
        assert isinstance(attention.build_mask(jnp.asarray(seg), name, 16), kind)


def test_packed_layout_as_cudnn_receives_it():
    """Through JAX's own conversion (what runs before the cuDNN call): one list of segments over the whole
    batch, each starting where the one before it ends (a row with one document and rows of several alike)."""
    fix = getattr(attention._cudnn_module, "_fix_seqlen_offsets", None)
    if fix is None:
        skip_unless_ci(f"jax {jax.__version__} has no _fix_seqlen_offsets to check against")
    for seg in ([[1] * 8, [1] * 8, [1] * 8], [[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 2, 2, 2, 2, 2, 2], [5] * 8]):
        seg = jnp.asarray(seg)
        B, T, N, H = seg.shape[0], seg.shape[1], 2, 4
        packed = attention.packed_layout(seg, 4)
        q = jnp.zeros((B, T, N, H))
        lengths, _, offsets, _ = fix(packed.lengths, packed.lengths, packed.offsets, packed.offsets, q, q)
        lengths, offsets = np.asarray(lengths).ravel(), np.asarray(offsets).ravel() // (N * H)
        flat = np.asarray(seg).ravel()
        runs = np.diff(np.flatnonzero(np.r_[True, (flat[1:] != flat[:-1]) | (np.arange(1, B * T) % T == 0), True]))
        n = len(runs)
        np.testing.assert_array_equal(lengths[:n], runs)
        np.testing.assert_array_equal(offsets[: n + 1], np.r_[0, np.cumsum(runs)])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_cudnn_plumbing_with_stand_in_kernels(monkeypatch, rng, remat):
    """What a model set to `cudnn` does around the two cuDNN kernels, on CPU: the packed layout built once, carried
    through the scanned (and rematerialised) layers, and the `lax.cond` that picks the packed kernel while every row
    fits max_segments and the masked one otherwise. The kernels are stood in for by the XLA reference, the packed
    one fed a mask rebuilt from the lengths and offsets alone, so a wrong layout shows as a wrong loss. Loss and
    gradients equal the xla model's; the branch that ran is recorded by a host callback."""
    ran = []

    def packed_stand_in(q, k, v, packed):
        jax.debug.callback(lambda _: ran.append("packed"), 0)
        T = q.shape[1]
        t = jnp.arange(T)[None, :, None]
        starts, lengths = packed.offsets[:, None, :-1], packed.lengths[:, None, :]
        member = (t >= starts) & (t < starts + lengths) & (lengths > 0)  # (B, T, M): token t in run m
        run = jnp.where(member.any(-1), jnp.argmax(member, -1), -1)
        mask = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] >= 0) & jnp.tri(T, dtype=bool)
        return attention.xla_attention(q, k, v, mask)

    def masked_stand_in(q, k, v, mask):
        jax.debug.callback(lambda _: ran.append("masked"), 0)
        return attention.xla_attention(q, k, v, mask)

    monkeypatch.setattr(attention, "_cudnn_packed", packed_stand_in)
    monkeypatch.setattr(attention, "_cudnn_biased", masked_stand_in)
    base = dataclasses.replace(load_model_preset("tiny-gqa"), remat=remat)
    ids = jnp.asarray(rng.integers(3, base.vocab_size, (3, 24)))
    runs = np.array([[8, 8, 8, 0], [5, 7, 9, 3], [24, 0, 0, 0]])  # documents per row; 0s: none
    seg = np.concatenate([np.repeat(np.arange(1, 5), r) for r in runs]).reshape(3, 24)
    seg[1, -3:] = 0  # the last run of row 1 is padding
    pos = np.concatenate([np.concatenate([np.arange(n) for n in r if n]) for r in runs]).reshape(3, 24)

    def loss_and_grads(cfg, seg):
        model = Llama(cfg, rngs=nnx.Rngs(0))
        loss = lambda m: jnp.mean(m(ids, jnp.asarray(pos), jnp.asarray(seg)) ** 2)
        return nnx.value_and_grad(loss)(model)

    for max_segments, seg_in, expect in ((4, seg, "packed"), (3, seg, "masked")):
        ran.clear()
        ref_loss, ref_grads = loss_and_grads(dataclasses.replace(base, attention="xla"), seg_in)
        loss, grads = loss_and_grads(dataclasses.replace(base, attention="cudnn", max_segments=max_segments), seg_in)
        jax.effects_barrier()
        assert set(ran) == {expect}, (max_segments, ran)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_cudnn_packed_fallback_warns_once(monkeypatch):
    """A JAX whose private cuDNN module moved: the run goes on (masked kernel) but says so, once."""
    attention._warn_packed_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="falls back to the masked kernel"):
        attention._warn_packed_fallback()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention._warn_packed_fallback()  # cached: silent the second time
