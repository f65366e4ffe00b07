"""Our Flax LLaMA against transformers' PyTorch LlamaForCausalLM on the same random weights (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mellama_jax.generate import greedy_generate


def _batch(rng, vocab, lengths):
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, vocab, n)
        mask[i, :n] = 1
    return ids, mask


def test_logits_match_with_right_padding(hf_pair, rng):
    hf, ours, cfg = hf_pair
    ids, mask = _batch(rng, cfg.vocab_size, [17, 9, 13])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    assert got.shape == ref.shape
    assert np.abs(got - ref)[valid].max() <= 1e-4


def test_logits_match_in_causal_query_blocks(hf_pair, rng, monkeypatch):
    """The causal path in blocks of queries that skip the keys after them (blocks of 5 here, of 64 queries in
    real use), with right padding, against transformers."""
    from mellama_jax.model import attention

    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
    assert len(attention.query_blocks(17, 17, True, attention.CAUSAL_BLOCK)) == 4
    test_logits_match_with_right_padding(hf_pair, rng)


def test_logits_match_with_left_padding_and_positions(hf_pair, rng):
    hf, ours, cfg = hf_pair
    ids, mask = _batch(rng, cfg.vocab_size, [12, 5, 8])
    ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # left padding, as for generation
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(positions), jnp.asarray(mask, jnp.int32)))
    assert np.abs(got - ref)[mask.astype(bool)].max() <= 1e-4


def test_greedy_generation_matches_transformers(hf_pair, rng):
    hf, ours, cfg = hf_pair
    prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (7, 3, 11)]
    ours_new = greedy_generate(ours, prompts, max_new_tokens=20)
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    np.testing.assert_array_equal(ours_new, out[:, width:].numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_rms_norm_is_bit_exact_with_transformers(dtype, rng):
    """RMSNorm promises Hugging Face's numerics: the statistic in fp32, the normalised row cast to the compute
    dtype, then multiplied by the scale cast to that dtype. transformers' LlamaRMSNorm upcasts the same way, so in
    bf16 the two agree bit for bit, not merely within bf16 rounding: statistics taken in bf16 move ~1 bf16 ulp
    in about a quarter of the outputs, which a tolerance of even 1e-2 lets through. Rows of very different scales
    (0.01 to 30) and a non-trivial scale vector; the module keeps its scale in fp32, as training does."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mellama_jax.model.layers import RMSNorm

    D = 256
    x32 = (rng.normal(size=(64, D)) * rng.uniform(0.01, 30, (64, 1))).astype(np.float32)
    scale = rng.normal(1.0, 0.3, D).astype(np.float32)
    ours = RMSNorm(D, 1e-5, dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    ours.scale[...] = jnp.asarray(scale)
    got = np.asarray(jax.jit(lambda x: ours(x))(jnp.asarray(x32, dtype)).astype(jnp.float32))

    torch_dtype = getattr(torch, dtype)
    ref_norm = LlamaRMSNorm(D, eps=1e-5).to(torch_dtype)  # a bf16 model holds its norm weights in bf16
    with torch.no_grad():
        ref_norm.weight.copy_(torch.tensor(scale).to(torch_dtype))
        ref = ref_norm(torch.tensor(x32).to(torch_dtype)).float().numpy()
    if dtype == "bfloat16":
        np.testing.assert_array_equal(got, ref)
    else:  # fp32 results differ only by the order of the mean's summation
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=0)
