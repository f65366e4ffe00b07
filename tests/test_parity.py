"""Our Flax LLaMA against transformers' PyTorch LlamaForCausalLM on the same random weights (fp32, CPU)."""

import jax.numpy as jnp
import numpy as np
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


def test_logits_match_with_left_padding_and_positions(hf_pair, rng):
    hf, ours, cfg = hf_pair
    ids, mask = _batch(rng, cfg.vocab_size, [12, 5, 8])
    ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # left padding, as for generation
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
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
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours_new, out[:, width:].numpy())
