"""Converters: HF <-> JAX round trips, transformers/PEFT parity, training checkpoints, bad inputs."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from conftest import hf_tiny_config
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mellama_jax import saved_params
from mellama_jax.cli import main
from mellama_jax.config import Config, LoraConfig, TrainConfig, to_dict
from mellama_jax.convert.api import ExportRequest, ImportRequest, hf_to_jax, jax_to_hf
from mellama_jax.convert.hf import ConversionError, config_from_hf, load_hf_state_dict
from mellama_jax.convert.peft import import_peft
from mellama_jax.convert.verify import VerifyRequest, verify
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.demo import sample_texts
from mellama_jax.generate import greedy_generate
from mellama_jax.model import Llama, init_abstract
from mellama_jax.saved_params import load_params_local, save_params


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    texts = [t for lines in sample_texts().values() for t in lines]
    return Tokenizer.train(texts, vocab_size=512).save(tmp_path_factory.mktemp("tok"))


def make_hf_dir(path: Path, kv_heads: int, seed: int, dtype=torch.float32, tokenizer=None, **kw) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_tiny_config(kv_heads, vocab_size=512, **kw)).to(dtype).eval()
    model.save_pretrained(path)
    if tokenizer:
        shutil.copyfile(tokenizer, path / "tokenizer.model")
    return path


def all_tensors(directory: Path) -> dict:
    out = {}
    for f in directory.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(
    "kv_heads, dtype",
    [(4, torch.float32), (2, torch.float32), (2, torch.bfloat16)],
    ids=["mha-fp32", "gqa-fp32", "gqa-bf16"],
)
def test_round_trip_is_bit_exact(tmp_path, tokenizer_file, kv_heads, dtype):
    src = make_hf_dir(tmp_path / "hf", kv_heads, seed=kv_heads, dtype=dtype, tokenizer=tokenizer_file)
    hf_to_jax(ImportRequest(src, tmp_path / "jax"), progress=False)
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    out = jax_to_hf(ExportRequest(tmp_path / "jax", tmp_path / "back", dtype=name, shard_size=200_000), progress=False)
    a, b = all_tensors(src), all_tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded with an index
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is True and tok_cfg["add_eos_token"] is False


def test_sharded_index_total_size_is_the_tensor_bytes(tmp_path, tokenizer_file):
    """The index's metadata.total_size (what the Hub and loaders show as the model's size) against the shards as
    safetensors itself reads them: the sum over tensors of elements x bytes per element."""
    from safetensors import safe_open

    src = make_hf_dir(tmp_path / "hf", 2, seed=12, tokenizer=tokenizer_file)
    params = hf_to_jax(ImportRequest(src, tmp_path / "jax"), progress=False)
    for dtype, size in (("bfloat16", 2), ("float32", 4)):
        out = jax_to_hf(ExportRequest(params, tmp_path / dtype, dtype=dtype, shard_size=40_000), progress=False)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        total, names = 0, set()
        for shard in set(index["weight_map"].values()):
            with safe_open(str(out / shard), framework="np") as f:
                for name in f.keys():
                    total += int(np.prod(f.get_slice(name).get_shape())) * size
                    names.add(name)
        assert names == set(index["weight_map"]) and index["metadata"]["total_size"] == total
        # greedy shards, as the shard size promises: each full enough that its successor's first tensor would
        # not have fitted, and none over the size unless a lone tensor is larger
        files = sorted(set(index["weight_map"].values()))
        sizes = []
        for shard in files:
            with safe_open(str(out / shard), framework="np") as f:
                sizes.append([int(np.prod(f.get_slice(n).get_shape())) * size for n in f.keys()])
        first_of = {shard: next(n for n in index["weight_map"] if index["weight_map"][n] == shard) for shard in files}
        for k in range(len(files) - 1):
            with safe_open(str(out / files[k + 1]), framework="np") as f:
                head = int(np.prod(f.get_slice(first_of[files[k + 1]]).get_shape())) * size
            assert sum(sizes[k]) + head > 40_000, (dtype, files[k])
        assert all(sum(s) <= 40_000 or len(s) == 1 for s in sizes)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_converted_model_matches_in_transformers(tmp_path, tokenizer_file, kv_heads):
    src = make_hf_dir(tmp_path / "hf", kv_heads, seed=10 + kv_heads, tokenizer=tokenizer_file)
    params = hf_to_jax(ImportRequest(src, tmp_path / "jax"), progress=False)
    out = jax_to_hf(ExportRequest(params, tmp_path / "out", dtype="float32"), progress=False)
    cfg = yaml.safe_load((params / "model.yaml").read_text())
    graphdef, abstract = nnx.split(init_abstract(type(Config().model)(**cfg)))
    ours = nnx.merge(graphdef, load_params_local(params, abstract))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, 512, (2, 14))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - np.asarray(ours(jnp.asarray(ids)))).max() <= 1e-4
    prompts = [list(ids[0, :5]), list(ids[1, :9])]
    new = greedy_generate(ours, prompts, 20)
    for p, row in zip(prompts, new):
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([p]),
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        np.testing.assert_array_equal(row, gen[0, len(p) :].numpy())
    report = verify(VerifyRequest(out, params))
    assert report["max_abs_logit_diff"] < 1e-4 and report["mean_kl"] < 1e-9


def test_bf16_checkpoints_keep_their_values_both_ways(tmp_path, rng, tokenizer_file):
    """bf16 weights read and written as bf16 values, checked through transformers: the round trip above stays
    bit-exact even when bf16 is mistaken for another 16-bit type on both sides, so here our model from a bf16
    checkpoint must give transformers' logits (its bf16 weights upcast to fp32), and our bf16 export must load
    into transformers as the very same model."""
    src = make_hf_dir(tmp_path / "hf", 2, seed=9, dtype=torch.bfloat16, tokenizer=tokenizer_file)
    params = hf_to_jax(ImportRequest(src, tmp_path / "jax"), progress=False)
    cfg = type(Config().model)(**yaml.safe_load((params / "model.yaml").read_text()))
    graphdef, abstract = nnx.split(init_abstract(cfg))
    ours = nnx.merge(graphdef, load_params_local(params, abstract))
    ids = rng.integers(3, 512, (2, 10))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - np.asarray(ours(jnp.asarray(ids)))).max() <= 1e-4
    out = jax_to_hf(ExportRequest(params, tmp_path / "out", dtype="bfloat16"), progress=False)
    with torch.no_grad():
        back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(torch.tensor(ids)).logits.numpy()
    np.testing.assert_array_equal(back, ref)


def test_trainer_restores_hf_to_jax_output_sharded(tmp_path, tokenizer_file):
    src = make_hf_dir(tmp_path / "hf", 2, seed=3)
    params = hf_to_jax(ImportRequest(src, tmp_path / "jax", dtype="float32", mesh="fsdp=4,tensor=2"), progress=False)
    zarray = json.loads((params / "layers.attn.wq.kernel" / ".zarray").read_text())
    assert zarray["chunks"] == [1, 64 // 4, 4 // 2, 16]  # one chunk per device shard of that mesh, per layer
    from mellama_jax.config import load_config
    from mellama_jax.train.step import build_trainer

    cfg = load_config(
        None,
        [
            f"model={params / 'model.yaml'}",
            "train.seq_len=16",
            "train.steps=2",
            "mesh.ici={data: 1, fsdp: 4, tensor: 2}",
        ],
    )
    trainer, state, _ = build_trainer(cfg)
    loaded = saved_params.load_params(params, state.params, trainer.state_shardings.params)
    wq = dict(nnx.to_flat_state(loaded))[("layers", "attn", "wq", "kernel")].get_value()
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    hf_q = load_file(str(src / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(wq)[1].reshape(64, -1).T, hf_q)


def test_converted_modules_match_transformers_modules(rng):
    """Every converted tensor, checked through the module that uses it: each of transformers' submodules (both
    norms of every layer, every projection, the embedding, the final norm, the head) against ours on the same
    random input. Independent of the tensor table and stronger than the round trip, which stays bit-exact when
    two table entries are swapped; the norm weights are randomised (a fresh HF model has them all at 1, where
    swapping them changes nothing)."""
    import jax

    torch.manual_seed(21)
    hf = LlamaForCausalLM(hf_tiny_config(2)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.tensor(rng.normal(1.0, 0.5, p.shape), dtype=p.dtype))
    cfg = config_from_hf(hf.config.to_dict())
    ours = load_hf_state_dict(cfg, {k: v.numpy() for k, v in hf.state_dict().items()})
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = rng.normal(size=(5, D)).astype(np.float32)
    h = rng.normal(size=(5, cfg.intermediate_size)).astype(np.float32)

    def same(hf_module, our_fn, inp, our_inp=None):
        with torch.no_grad():
            ref = hf_module(torch.tensor(inp)).numpy()
        got = np.asarray(our_fn(jnp.asarray(inp if our_inp is None else our_inp))).reshape(ref.shape)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)

    graphdef, stacked = nnx.split(ours.layers)
    for i, hf_layer in enumerate(hf.model.layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))  # noqa: B023 (used at once)
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        same(hf_layer.input_layernorm, layer.attn_norm, x)
        same(hf_layer.post_attention_layernorm, layer.mlp_norm, x)
        same(attn.q_proj, layer.attn.wq, x)
        same(attn.k_proj, layer.attn.wk, x)
        same(attn.v_proj, layer.attn.wv, x)
        same(attn.o_proj, layer.attn.wo, x[:, : H * Dh], x[:, : H * Dh].reshape(5, H, Dh))
        same(mlp.gate_proj, layer.mlp.w_gate, x)
        same(mlp.up_proj, layer.mlp.w_up, x)
        same(mlp.down_proj, layer.mlp.w_down, h)
    assert K < H  # grouped-query: k/v projections are narrower than q's
    ids = rng.integers(0, cfg.vocab_size, (7,))
    same(hf.model.embed_tokens, ours.embed, torch.tensor(ids).numpy())
    same(hf.model.norm, ours.norm, x)
    same(hf.lm_head, ours.lm_head, x)


@pytest.fixture
def lora_run(tmp_path, tokenizer_file):
    """A LoRA 'run' directory: base params, adapters with non-zero B, and its config.yaml."""
    src = make_hf_dir(tmp_path / "hf", 2, seed=5, tokenizer=tokenizer_file)
    base = hf_to_jax(ImportRequest(src, tmp_path / "base", dtype="float32"), progress=False)
    model_cfg = type(Config().model)(**yaml.safe_load((base / "model.yaml").read_text()))
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wv", "wo", "w_down"))
    model = Llama(model_cfg, rngs=nnx.Rngs(1), lora=lora)
    _, adapters, _ = nnx.split(model, nnx.LoRAParam, ...)
    rng = np.random.default_rng(2)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype), adapters)
    run = tmp_path / "run"
    save_params(run / "adapters", adapters)
    cfg = Config(model=model_cfg, lora=lora, train=TrainConfig(mode="lora"))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return src, base, run, model_cfg, lora


def _jax_lora_logits(base, run, model_cfg, lora, ids):
    graphdef, ad_abs, base_abs = nnx.split(init_abstract(model_cfg, lora), nnx.LoRAParam, ...)
    model = nnx.merge(graphdef, load_params_local(run / "adapters", ad_abs), load_params_local(base, base_abs))
    return np.asarray(model(jnp.asarray(ids)))


def test_peft_adapters_and_merged_export_match_jax(lora_run, tmp_path):
    from peft import PeftModel

    src, base, run, model_cfg, lora = lora_run
    ids = np.random.default_rng(4).integers(3, 512, (2, 12))
    ours = _jax_lora_logits(base, run, model_cfg, lora, ids)
    adapter_dir = jax_to_hf(ExportRequest(base, tmp_path / "peft", adapters=run / "adapters"), progress=False)
    assert (adapter_dir / "adapter_config.json").exists()
    hf_base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = hf_base(torch.tensor(ids)).logits.numpy()
    peft_model = PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - plain).max() > 1e-2  # the adapters matter
    assert np.abs(ref - ours).max() <= 1e-4
    merged = jax_to_hf(
        ExportRequest(base, tmp_path / "merged", dtype="float32", adapters=run / "adapters", merge=True), progress=False
    )
    with torch.no_grad():
        ref_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(torch.tensor(ids)).logits
    assert np.abs(ref_merged.numpy() - ours).max() <= 1e-4
    # and back: PEFT -> ours gives the same arrays
    lora2, tree = import_peft(adapter_dir, model_cfg)
    assert set(lora2.targets) == set(lora.targets) and lora2.rank == 4 and lora2.alpha == 8.0
    stored = load_params_local(run / "adapters", nnx.split(init_abstract(model_cfg, lora), nnx.LoRAParam, ...)[1])
    for path, var in nnx.to_flat_state(stored):
        node = tree
        for k in path:
            node = node[k]
        np.testing.assert_allclose(node, np.asarray(var.get_value()), atol=1e-7)


def test_adapter_gradients_match_peft_autograd(lora_run, tmp_path):
    """d(sum(logits * C))/d(adapters), ours (the projections' own backward, the A factors' transposed) against
    torch autograd through PEFT; ours written out by the PEFT exporter so both sides carry PEFT's names."""
    from peft import PeftModel

    src, base, run, model_cfg, lora = lora_run
    rng = np.random.default_rng(5)
    ids = rng.integers(3, 512, (2, 12))
    cotangent = rng.normal(size=(2, 12, 512)).astype(np.float32)
    graphdef, ad_abs, base_abs = nnx.split(init_abstract(model_cfg, lora), nnx.LoRAParam, ...)
    frozen = load_params_local(base, base_abs)
    grads = jax.grad(lambda ad: jnp.sum(nnx.merge(graphdef, ad, frozen)(jnp.asarray(ids)) * cotangent))(
        load_params_local(run / "adapters", ad_abs)
    )
    save_params(tmp_path / "grads" / "adapters", grads)
    shutil.copyfile(run / "config.yaml", tmp_path / "grads" / "config.yaml")
    grad_dir = jax_to_hf(
        ExportRequest(base, tmp_path / "grads-peft", adapters=tmp_path / "grads" / "adapters"), progress=False
    )
    ours = load_file(str(grad_dir / "adapter_model.safetensors"))
    adapter_dir = jax_to_hf(ExportRequest(base, tmp_path / "peft", adapters=run / "adapters"), progress=False)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), adapter_dir, is_trainable=True
    )
    (peft_model(torch.tensor(ids)).logits * torch.tensor(cotangent)).sum().backward()
    ref = {n.replace(".default", ""): p.grad.numpy() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert set(ref) == set(ours) and len(ref) == 2 * 4 * model_cfg.num_layers
    for name, g in ref.items():
        assert np.abs(g).max() > 1e-3, name  # every factor gets a real gradient (B is non-zero in this run)
        np.testing.assert_allclose(ours[name], g, rtol=1e-4, atol=1e-4 * np.abs(g).max(), err_msg=name)


def test_export_from_a_training_checkpoint_written_by_8_devices(tmp_path, tokenizer_file):
    from mellama_jax.config import load_config
    from mellama_jax.train import checkpoint
    from mellama_jax.train.step import build_trainer

    cfg = load_config(
        None, ["model=tiny-gqa", "train.seq_len=16", "train.steps=2", "mesh.ici={data: 1, fsdp: 4, tensor: 2}"]
    )
    trainer, state, _ = build_trainer(cfg)
    mngr = checkpoint.manager(tmp_path / "run" / "checkpoints", cfg.checkpoint)
    import orbax.checkpoint as ocp

    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    shutil.copyfile(tokenizer_file, tmp_path / "run" / "tokenizer.model")  # as a run carries it
    out = jax_to_hf(
        ExportRequest(tmp_path / "run" / "checkpoints" / "0" / "state", tmp_path / "hf", dtype="float32"),
        progress=False,
    )
    tensors = all_tensors(out)
    wo = np.asarray(dict(nnx.to_flat_state(state.params))[("layers", "attn", "wo", "kernel")].get_value())
    np.testing.assert_array_equal(tensors["model.layers.2.self_attn.o_proj.weight"], wo[2].reshape(64, 64).T)


def _break_missing(d):
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    return "missing tensor model.layers.1.mlp.up_proj.weight"


def _break_shape(d):
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    save_file(t, str(d / "model.safetensors"))
    return "tensor model.layers.0.self_attn.k_proj.weight has shape (8, 64)"


def _break_config(d):
    c = json.loads((d / "config.json").read_text())
    c["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(c))
    return "missing tensor model.layers.2."


def _break_truncated(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    return "truncated or corrupt"


def _break_pickle(d):
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    return "refused because unpickling can run arbitrary code"


def plant(out: Path, dst: Path, fault) -> Path:
    """A copy of the export `out` with one tensor changed as a release bug would change it."""
    shutil.copytree(out, dst)
    t = load_file(str(dst / "model.safetensors"))
    kind, name = fault
    if kind == "swap":
        other = name.replace("up_proj", "gate_proj")
        t[name], t[other] = t[other], t[name]
    else:
        t[name] = (t[name].astype(np.float32) * {"scale": 1.01, "zero": 0.0}[kind]).astype(t[name].dtype)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


FAULTS = {  # fault -> the stage verify must name first (the residual stream after it diverges)
    ("swap", "model.layers.0.mlp.up_proj.weight"): "layer 0",
    ("scale", "model.layers.1.self_attn.q_proj.weight"): "layer 1",
    ("zero", "model.norm.weight"): "final norm and lm_head (logits)",
}
EVERY_TENSOR = {
    ("scale", f"model.layers.{i}.{n}.weight"): f"layer {i}"
    for i, n in (
        (0, "self_attn.k_proj"),
        (1, "self_attn.v_proj"),
        (0, "self_attn.o_proj"),
        (1, "mlp.gate_proj"),
        (0, "mlp.up_proj"),
        (1, "mlp.down_proj"),
        (0, "input_layernorm"),
        (1, "post_attention_layernorm"),
    )
}
EVERY_TENSOR.update(
    {
        ("scale", "model.embed_tokens.weight"): "embedding",
        ("scale", "lm_head.weight"): "final norm and lm_head (logits)",
    }
)


@pytest.fixture(scope="module")
def verify_exports(tmp_path_factory, tokenizer_file):
    tmp = tmp_path_factory.mktemp("verify")
    src = make_hf_dir(tmp / "hf", 2, seed=3, tokenizer=tokenizer_file)
    params = hf_to_jax(ImportRequest(src, tmp / "jax", dtype="float32"), progress=False)
    return (
        tmp,
        params,
        {d: jax_to_hf(ExportRequest(params, tmp / d, dtype=d), progress=False) for d in ("float32", "bfloat16")},
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_passes_faithful_exports_and_names_the_layer_of_a_fault(verify_exports, dtype):
    """A 1% change to one tensor moves that layer's output by ~1e-3 relative, a faithful export (same weights,
    fp32 both sides) by ~1e-6; the old defaults (|logit diff| 0.5) passed the 1% change."""
    tmp, params, outs = verify_exports
    report = verify(VerifyRequest(outs[dtype], params))
    assert report["ok"] and report["max_relative_diff"] < report["tolerance"] / 20, report
    for fault, stage in FAULTS.items():
        bad = verify(VerifyRequest(plant(outs[dtype], tmp / f"{dtype}-{fault[0]}", fault), params))
        assert not bad["ok"] and bad["first_divergent"] == stage, (fault, bad)


def test_verify_refuses_an_export_of_another_model(verify_exports):
    tmp, params, outs = verify_exports
    with pytest.raises(
        ConversionError, match=r"config.json: vocab_size is 512, the parameters' model has 256: not an export"
    ):
        verify(VerifyRequest(outs["float32"], params, model="tiny"))


@pytest.mark.slow  # 10 more verifies (45 s): `make test-all`
def test_verify_fails_a_one_percent_change_to_any_tensor(verify_exports):
    tmp, params, outs = verify_exports
    for fault, stage in EVERY_TENSOR.items():
        bad = verify(VerifyRequest(plant(outs["bfloat16"], tmp / f"every-{fault[1]}", fault), params))
        assert not bad["ok"] and bad["first_divergent"] == stage, (fault, bad)


def test_verify_checks_a_merged_lora_export_against_the_adapters(lora_run, tmp_path):
    src, base, run, _, _ = lora_run
    merged = jax_to_hf(
        ExportRequest(base, tmp_path / "merged", adapters=run / "adapters", merge=True, dtype="bfloat16"),
        progress=False,
    )
    assert verify(VerifyRequest(merged, base, adapters=run / "adapters"))["ok"]
    plain = jax_to_hf(ExportRequest(base, tmp_path / "plain", dtype="bfloat16", tokenizer=src), progress=False)
    assert not verify(VerifyRequest(plain, base, adapters=run / "adapters"))["ok"]  # the adapters left out


@pytest.mark.parametrize(
    "breaker",
    [_break_missing, _break_shape, _break_config, _break_truncated, _break_pickle],
    ids=["missing", "shape", "config", "truncated", "pickle"],
)
def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path, breaker):
    src = make_hf_dir(tmp_path / "hf", 2, seed=7)
    message = breaker(src)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf_to_jax(ImportRequest(src, tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli_convert_and_verify(tmp_path, tokenizer_file, capsys):
    src = make_hf_dir(tmp_path / "hf", 2, seed=8, tokenizer=tokenizer_file)
    assert main(["convert", "hf-to-jax", str(src), str(tmp_path / "jax")]) == 0
    assert main(["convert", "jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert main(["convert", "verify", str(tmp_path / "out"), str(tmp_path / "jax")]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 2)[-1])["ok"] is True
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"] * 3  # a wrong model: verify must fail
    save_file(t, str(tmp_path / "out" / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", "verify", str(tmp_path / "out"), str(tmp_path / "jax")]) == 1
    t["model.norm.weight"] = t["model.norm.weight"] / 3
    t["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")  # NaN differences are failures, not passes
    save_file(t, str(tmp_path / "out" / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["convert", "verify", str(tmp_path / "out"), str(tmp_path / "jax")]) == 1
    assert '"ok": false' in capsys.readouterr().out
    assert main(["convert", "hf-to-jax", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2


def test_decoding_reads_lora_adapters(lora_run, tmp_path):
    """generate/eval's JAX backend on base + adapters decodes as transformers does on the merged export, on one
    device and with base and adapters restored straight into a tensor-parallel mesh."""
    from mellama_jax.eval.run import HFBackend, JaxBackend

    _, base, run, _, _ = lora_run
    merged = jax_to_hf(
        ExportRequest(base, tmp_path / "merged", dtype="float32", adapters=run / "adapters", merge=True), progress=False
    )
    prompts = ["the patient was given", "aspirin"]
    ours = JaxBackend(base, adapters=run / "adapters", dtype="float32").generate(prompts, 8)
    assert ours == HFBackend(merged, dtype="float32").generate(prompts, 8)
    assert ours != JaxBackend(base, dtype="float32").generate(prompts, 8)  # the adapters change the output
    sharded = JaxBackend(base, adapters=run / "adapters", dtype="float32", mesh="data=4,tensor=2")
    assert sharded.generate(prompts, 8) == ours
    lora_b = sharded.model.decoder.layers[0]["attn"]["wq"]["lora_b"].get_value()
    assert lora_b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")  # (rank, heads, head_dim)
