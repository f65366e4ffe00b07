"""Loading a model to decode with: straight into the mesh, in the asked dtype, never whole on one device; the
memory check that names a mesh that fits; prompts fitted into the model's positions as the authors' harness did."""

import dataclasses
import gc
import json
import math
import shutil
import threading

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from mellama_jax.config import ConfigError, MeshConfig, load_model_preset
from mellama_jax.convert.api import ExportRequest, ImportRequest, hf_to_jax, jax_to_hf
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.eval.run import EvalRequest, GenerateRequest, complete, evaluate
from mellama_jax.eval.tasks import load_task, load_templates, render
from mellama_jax.generate import decoder, shard_for_decoding
from mellama_jax.inference import GiB, check_fits, fit_prompt, layout_of, load_for_decoding
from mellama_jax.model.loading import load_model
from mellama_jax.sharding import make_mesh, state_shardings


@pytest.fixture(scope="module")
def eight_heads(demo_data, tmp_path_factory):
    """A random model with 8 KV heads (so tensor=8 splits every attention weight), the demo tokenizer, 256
    positions: our checkpoint (float32, as hf-to-jax writes it) and its transformers export."""
    root = tmp_path_factory.mktemp("eight-heads")
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(hf_cfg).eval().save_pretrained(root / "hf")
    shutil.copyfile(demo_data / "tok" / "tokenizer.model", root / "hf" / "tokenizer.model")
    params = hf_to_jax(ImportRequest(root / "hf", root / "jax"), progress=False)
    exported = jax_to_hf(ExportRequest(params, root / "hf-out", dtype="float32"), progress=False)
    return params, exported


class LiveBytes:
    """The bytes of live JAX arrays on each device, sampled from another thread while the body runs: what the
    devices hold, whichever code put it there. Each array counts its shard on each device it lies on."""

    def __init__(self):
        self.peak, self._stop = {}, threading.Event()

    @staticmethod
    def now() -> dict:
        held = {d: 0 for d in jax.devices()}
        for a in jax.live_arrays():
            with_shard = math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
            for d in a.sharding.device_set:
                held[d] += with_shard
        return held

    def _run(self):
        while not self._stop.is_set():
            for d, n in self.now().items():
                self.peak[d] = max(self.peak.get(d, 0), n)

    def __enter__(self):
        gc.collect()
        self.before = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        gc.collect()
        self.after = self.now()

    def growth(self, which: str = "peak") -> dict:
        return {
            d: max(getattr(self, which).get(d, 0), self.after[d]) - self.before[d]
            if which == "peak"
            else getattr(self, which)[d] - self.before[d]
            for d in self.before
        }


def _largest_tensor_bytes(params) -> int:
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(params.absolute()).item_metadata
    return max(math.prod(m.shape) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(meta))


@pytest.mark.parametrize("layout", ["tensor=8", "fsdp=8"])
def test_loading_into_a_mesh_holds_each_devices_share_and_at_most_one_tensor_more(eight_heads, layout):
    """Measured on the live buffers of 8 devices: while the model loads (restore, then the decoder's per-layer
    slicing), no device grows by more than its final share plus the largest tensor. The old path (everything on
    device 0, then spread over the mesh) is measured the same way and exceeds that bound there, so the measure
    sees what it is meant to. The loaded arrays equal the single-device load and sit in the rule table's layout."""
    params, _ = eight_heads
    largest = _largest_tensor_bytes(params)
    with LiveBytes() as live:
        loaded = load_for_decoding(params, dtype="float32", mesh=layout)
    share, peak = live.growth("after"), live.growth()
    for d in jax.devices():
        assert share[d] > 0 and peak[d] <= share[d] + largest, (d, peak[d], share[d], largest)
    del loaded
    mesh_cfg = MeshConfig(ici=layout_of(layout))
    mesh = make_mesh(mesh_cfg)
    with LiveBytes() as old:
        spread = decoder(shard_for_decoding(load_model(params, dtype="float32"), mesh, mesh_cfg.rules), consume=True)
    device0 = jax.devices()[0]
    assert old.growth()[device0] > old.growth("after")[device0] + largest
    del spread

    direct, single = load_model(params, dtype="float32", mesh=mesh, rules=mesh_cfg.rules), load_model(params)
    state = nnx.state(direct)
    expected = state_shardings(state, mesh, mesh_cfg.rules)
    jax.tree.map(
        lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(f"{a.sharding} != {s}"),
        jax.tree.leaves(state),
        jax.tree.leaves(expected),
    )
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(state), jax.tree.leaves(nnx.state(single)))


def test_sharded_generation_equals_transformers_in_fp32_and_stays_close_in_bf16(eight_heads):
    """On tensor=8: float32 greedy tokens equal transformers' on the exported model; bfloat16 parameters restored
    from the float32 checkpoint (cast as read) give logits within bf16 rounding of transformers' float32 ones
    (relative L2 per position under 2^-5: 8 bits of mantissa lose ~2^-9 per operation, summed over 2 layers and
    the head), and the same first token."""
    params, exported = eight_heads
    hf = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 512, n)) for n in (9, 4, 17)]
    width = max(map(len, prompts))
    ids, mask = torch.zeros((3, width), dtype=torch.long), torch.zeros((3, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, width:].numpy()
    fp32 = load_for_decoding(params, dtype="float32", mesh="tensor=8")
    np.testing.assert_array_equal(fp32.generate(prompts, 10, None), ref)

    bf16 = load_for_decoding(params, dtype="bfloat16", mesh="tensor=8")
    assert {x.dtype for x in jax.tree.leaves(bf16.decoder.layers)} == {np.dtype(jax.numpy.bfloat16)}
    np.testing.assert_array_equal(bf16.generate(prompts, 1, None)[:, 0], ref[:, 0])
    for p, first in zip(prompts, ref[:, 0], strict=True):  # one row: the CPU's bf16 lookup and one-row matmul
        assert bf16.generate([p], 1, None)[0, 0] == first
    mesh_cfg = MeshConfig(ici=layout_of("tensor=8"))
    model = load_model(params, dtype="bfloat16", mesh=make_mesh(mesh_cfg), rules=mesh_cfg.rules)
    for p in prompts:
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].numpy()
        got = np.asarray(model(jax.numpy.asarray([p])), dtype=np.float32)[0]
        rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
        assert rel.max() < 2**-5, rel.max()


def test_a_model_too_big_for_one_device_names_the_mesh_that_fits():
    """By hand, LLaMA2-70B in bf16 (68,976,648,192 parameters, Meta's count): 137.95 GB of parameters; the
    decoder's slicing holds the largest stacked weight once more (80 x 8192 x 28672 x 2 B = 37.58 GB); the KV
    cache for one row of 4096 positions is 2 x 80 layers x 4096 x 8 KV heads x 128 x 2 B = 1.34 GB. One device:
    176.88 GB = 164.7 GiB. Every weight splits over tensor (norms, 0.003 GB, stay whole): tensor=2 needs 82.4 GiB,
    over an 80 GiB card, so on 8 of them the line names data=2,tensor=4 (41.2 GiB)."""
    rules = MeshConfig().rules
    cfg = load_model_preset("llama2-70b")
    with pytest.raises(ConfigError) as e:
        check_fits(cfg, None, "bfloat16", layout_of(None), rules, 1, 4096, 80 * GiB, 8)
    assert str(e.value) == (
        "llama2-70b in bfloat16 needs 164.7 GiB per device on one device (parameters, KV cache "
        "for 1 x 4096 positions), a device has 80.0 GiB: pass --mesh data=2,tensor=4 (41.2 GiB "
        "per device)"
    )
    check_fits(cfg, None, "bfloat16", layout_of("data=2,tensor=4"), rules, 1, 4096, 80 * GiB, 8)
    # LLaMA2-13B (13,015,864,320 parameters) fits one 40 GiB card for one row: 26.03 GB + 5.66 GB (40 x 5120 x
    # 13824 x 2 B) + 3.36 GB of cache (2 x 40 x 4096 x 40 heads x 128 x 2 B) = 35.05 GB = 32.6 GiB
    check_fits(load_model_preset("llama2-13b"), None, "bfloat16", layout_of(None), rules, 1, 4096, 40 * GiB, 1)
    with pytest.raises(ConfigError, match=r"needs 32.6 GiB .* it does not fit the 1 devices here"):
        check_fits(load_model_preset("llama2-13b"), None, "bfloat16", layout_of(None), rules, 1, 4096, 32 * GiB, 1)
    check_fits(cfg, None, "bfloat16", layout_of(None), rules, 1, 4096, None, 8)  # CPU: no limit, no check


def test_mesh_layouts_and_cache_length():
    """-1 takes the rest of the devices; sizes below 1 are refused in one line. The cache `generate` makes for the
    longest prompt that fits 4096 positions with 256 new tokens: 3840 prompt positions padded to their bucket
    (4096, the next of 3072, 4096, ...) plus the 256: 4352."""
    from mellama_jax.generate import bucket
    from mellama_jax.inference import cache_length

    assert layout_of("tensor=2,fsdp=-1", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    for bad in ("tensor=0", "tensor=-2", "fsdp=-1,data=-1"):
        with pytest.raises(ConfigError, match="axis sizes must be positive"):
            layout_of(bad, 8)
    assert bucket(3840) == 4096 and cache_length(4096, 256) == 4352


def test_an_over_long_prompt_keeps_what_the_harness_keeps(eight_heads, tmp_path, capsys):
    """The harness: `tok_encode(context)[max_gen_toks - max_length:]` (lm_eval/base.py:447), the context encoded
    without BOS. With 256 positions and 8 new tokens it keeps the last 248 tokens; ours keeps BOS and the last 247,
    the same 248 positions. `eval` counts the prompts it cut in summary.json and says so once; its output for the
    cut prompt equals transformers' greedy continuation of exactly those tokens. `generate` refuses the prompt in
    one line unless --truncate."""
    params, exported = eight_heads
    tok = Tokenizer.load(exported / "tokenizer.model")
    premise = " ".join(f"Patient {i} received metformin and improved." for i in range(60))
    data = tmp_path / "bionli.jsonl"
    data.write_text(
        "".join(
            json.dumps({"premise": p, "hypothesis": "Metformin helps.", "label_cat": "pos"}) + "\n"
            for p in (premise, "Metformin was given.")
        )
    )
    text_ids = tok.encode(premise, bos=False)
    harness = text_ids[8 - 256 :]
    ours, cut = fit_prompt([tok.bos_id] + text_ids, 256, 8)
    assert cut and len(ours) == len(harness) == 248 and ours[0] == tok.bos_id and ours[1:] == harness[1:]
    assert fit_prompt([1, 5, 6], 256, 8) == ([1, 5, 6], False)
    with pytest.raises(ConfigError, match="leaves no room"):
        fit_prompt([1, 5], 256, 255)

    summary = evaluate(EvalRequest("bionli", data, params, tmp_path / "out", max_new_tokens=8, dtype="float32"))
    assert summary["truncated_prompts"] == 1 and summary["dtype"] == "float32"
    assert capsys.readouterr().err.count("1 of 2 prompts did not fit") == 1
    row = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    _, examples, entry = load_task("bionli", data, load_templates(None))
    prompt_ids = tok.encode(render(entry["prompt"], examples[0].fields), bos=True)
    kept, _ = fit_prompt(prompt_ids, 256, 8)
    hf = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        new = hf.generate(input_ids=torch.tensor([kept]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 248:]
    whole, head = tok.decode(kept + [t for t in new.tolist() if t != 0]), tok.decode(kept)
    assert row["output"] == whole[len(head) :]
    hf_summary = evaluate(
        EvalRequest("bionli", data, exported, tmp_path / "hf", backend="hf", max_new_tokens=8, dtype="float32")
    )
    assert hf_summary["truncated_prompts"] == 1

    with pytest.raises(
        ValueError,
        match=r"prompt 1 has \d+ tokens; with 8 new tokens it needs \d+ positions, the "
        r"model has 256: .* --truncate \(keeps BOS and its last 247 tokens\)",
    ):
        complete(GenerateRequest(params, [premise], max_new_tokens=8, dtype="float32"))
    assert complete(GenerateRequest(params, [premise], max_new_tokens=8, dtype="float32", truncate=True))


def _decode_temporaries(dtype: str, rows: int) -> int:
    """XLA's temporary bytes for decoding `rows` prompts of 4 tokens (8 new) on one CPU device, compiled only."""
    from mellama_jax.generate import _decode, left_pad
    from mellama_jax.model import Llama

    cfg = dataclasses.replace(
        load_model_preset("tiny"),
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_heads=4,
        num_kv_heads=4,
        num_layers=2,
        param_dtype=dtype,
        dtype=dtype,
    )
    parts = decoder(Llama(cfg, rngs=nnx.Rngs(0)), consume=True)
    ids, mask = left_pad([[1, 5, 6, 7]] * rows, 0, buckets=True)
    args = (jax.numpy.asarray(ids), jax.numpy.asarray(mask), 8, jax.numpy.int32(2), jax.random.key(0), 0.0, 1.0, None)
    return _decode.lower(*parts, *args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("rows", [1, 3])
def test_bf16_decoding_on_cpu_holds_no_fp32_copy_of_the_weights(rows):
    """XLA's CPU backend gathers bf16 embedding rows from an fp32 copy of the table, and runs a one-row bf16
    product as an fp32 multiply-reduce over a converted copy of the weight; decoding one sequence then held an
    fp32 copy of the whole model (8.4 MB of bf16 weights here: 17.7 MB of temporaries). The reference is the same
    decode with fp32 weights, which converts nothing (and whose activations are twice the bf16 ones): bf16 may
    exceed it only by one bf16 copy of the table (2 MB), which XLA materialises to gather its rows as bits."""
    table_bf16 = 4096 * 256 * 2
    assert _decode_temporaries("bfloat16", rows) <= _decode_temporaries("float32", rows) + table_bf16


def test_the_cpu_decoding_paths_compute_what_the_plain_ones_do():
    """`Embed.lookup` (decoding's gather, bits on CPU) returns the very rows `Embed.__call__` does, for a table
    stored in bf16 or fp32 and computed in either; a one-row bf16 `matmul` (run as two rows on CPU) equals numpy's
    fp32 product of the same bf16 values to fp32 rounding, over one and two contracted dims, in the asked output
    dtype (a bf16 output: numpy's product rounded to bf16, to one bf16 step)."""
    from mellama_jax.model.layers import Embed, matmul

    ids = jax.numpy.asarray([[3, 0, 511, 3]])
    for stored, computed in (("bfloat16", "bfloat16"), ("float32", "float32"), ("float32", "bfloat16")):
        embed = Embed(512, 64, dtype=computed, param_dtype=stored, init_std=1.0, rngs=nnx.Rngs(0))
        got, want = embed.lookup(ids), embed(ids)
        assert got.dtype == want.dtype == np.dtype(computed) and got.shape == (1, 4, 64)
        assert np.array_equal(np.asarray(got), np.asarray(want))
    rng = np.random.default_rng(0)
    bf16, f32 = jax.numpy.bfloat16, jax.numpy.float32
    cases = (((1, 1, 64), (64, 96), 1), ((1, 64), (64, 96), 1), ((1, 1, 4, 16), (4, 16, 96), 2))
    for (x_shape, w_shape, n), out in zip(cases, (f32, bf16, f32), strict=True):
        x, w = (jax.numpy.asarray(rng.standard_normal(s), bf16) for s in (x_shape, w_shape))
        got = matmul(x, w, n, bf16, out)
        assert got.dtype == out and got.shape == x_shape[: len(x_shape) - n] + (96,)
        xs, ws = np.asarray(x, np.float32), np.asarray(w, np.float32)
        want = xs.reshape(1, -1) @ ws.reshape(xs.reshape(1, -1).shape[1], -1)
        tol = 2**-8 if out == bf16 else 1e-5
        np.testing.assert_allclose(np.asarray(got, np.float32).reshape(1, -1), want, rtol=tol, atol=tol)


def test_training_on_cpu_in_bf16_still_trains_the_embedding():
    """Decoding's lookup gathers bits, which carry no gradient; training and scoring must keep the plain gather.
    A bf16-stored model on CPU: the loss's gradient reaches exactly the embedding rows of the tokens used."""
    from mellama_jax.model import Llama

    cfg = dataclasses.replace(
        load_model_preset("tiny"), vocab_size=64, param_dtype="bfloat16", dtype="bfloat16", num_layers=1
    )
    graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.numpy.asarray([[5, 9, 9, 17]])

    def loss(params):
        return nnx.merge(graphdef, params)(tokens).astype(jax.numpy.float32).std()

    grad = np.asarray(jax.grad(loss)(params)["embed"]["embedding"][...], np.float32)
    touched = sorted(np.flatnonzero(np.abs(grad).sum(axis=1)))
    assert touched == [5, 9, 17]
