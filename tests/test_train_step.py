"""The sharded train step on 8 simulated CPU devices: layouts agree, accumulation is exact, masks work."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from train_helpers import run_steps, single_device, synthetic_batch
from transformers import get_cosine_schedule_with_warmup

from mellama_jax.config import LORA_TARGETS, LoraConfig, OptimizerConfig, load_config, load_model_preset
from mellama_jax.train import flops
from mellama_jax.train.optimizer import learning_rate_schedule

LAYOUTS = {
    "data8": ["mesh.ici={data: 8, fsdp: 1, tensor: 1}"],
    "fsdp8": ["mesh.ici={data: 1, fsdp: 8, tensor: 1}"],
    "data2_fsdp2_tensor2": ["mesh.ici={data: 2, fsdp: 2, tensor: 2}"],
    "fsdp4_tensor2": ["mesh.ici={data: 1, fsdp: 4, tensor: 2}"],
}


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(1)
    return [synthetic_batch(rng, 8, 16, 256) for _ in range(5)]


@pytest.fixture(scope="module")
def reference(batches):
    return run_steps(["mesh.ici={data: 1, fsdp: 1, tensor: 1}"], batches, single_device())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_match_single_device(layout, batches, reference):
    ref_losses, ref_params, _, _ = reference
    losses, params, state, _ = run_steps(LAYOUTS[layout], batches)
    assert len(state.params["embed"]["embedding"].get_value().sharding.device_set) == 8
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    assert ref_losses[-1] < ref_losses[0]  # it trains
    for path, value in ref_params.items():
        np.testing.assert_allclose(params[path], value, atol=1e-5, rtol=0, err_msg=str(path))


@pytest.mark.slow  # 14 s; the gradients themselves are checked by
# test_accumulated_gradients_equal_the_big_batch_gradient
def test_accumulation_equals_large_batch(batches):
    big = {k: np.concatenate([b[k] for b in batches[:4]]) for k in batches[0]}  # 32 rows
    common = ["train.batch_size=32", "mesh.ici={data: 2, fsdp: 2, tensor: 2}"]
    one_losses, one_params, _, _ = run_steps(common + ["train.grad_accum=1"], [big])
    acc_losses, acc_params, _, _ = run_steps(common + ["train.grad_accum=4"], [big])
    np.testing.assert_allclose(acc_losses, one_losses, atol=1e-6, rtol=0)
    for path, value in one_params.items():
        np.testing.assert_allclose(acc_params[path], value, atol=1e-6, rtol=0, err_msg=str(path))


def test_shardings_follow_the_rule_table(batches):
    _, _, state, trainer = run_steps(LAYOUTS["fsdp4_tensor2"], batches[:1])
    expected = {  # written out by hand from the default rules: embed->fsdp, heads/kv_heads/mlp/vocab->tensor
        ("embed", "embedding"): P("tensor", "fsdp"),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
        ("norm", "scale"): P(None),
        ("layers", "attn_norm", "scale"): P(None, None),
        ("layers", "mlp_norm", "scale"): P(None, None),
        ("layers", "attn", "wq", "kernel"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "wk", "kernel"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "wv", "kernel"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "wo", "kernel"): P(None, "tensor", None, "fsdp"),
        ("layers", "mlp", "w_gate", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "w_up", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "w_down", "kernel"): P(None, "tensor", "fsdp"),
    }
    adam = next(
        s
        for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    )
    trees = {"params": state.params, "mu": adam.mu, "nu": adam.nu}
    for name, tree in trees.items():
        flat = dict(nnx.to_flat_state(tree))
        assert set(flat) == set(expected), name
        for path, spec in expected.items():
            sh = flat[path].get_value().sharding
            assert sh.spec == spec, (name, path, sh.spec)
            assert sh.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}


def test_masked_tokens_contribute_nothing(batches):
    batch = batches[0]
    changed = dict(batch, targets=np.where(batch["loss_weights"] > 0, batch["targets"], (batch["targets"] + 7) % 256))
    assert (changed["targets"] != batch["targets"]).any()
    common = ["mesh.ici={data: 2, fsdp: 4, tensor: 1}"]
    loss_a, params_a, _, _ = run_steps(common, [batch])
    loss_b, params_b, _, _ = run_steps(common, [changed])
    assert loss_a == loss_b
    for path in params_a:
        np.testing.assert_array_equal(params_a[path], params_b[path])


def test_loss_against_hand_computed_cross_entropy():
    logits = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]], np.float32))
    from mellama_jax.train.step import token_losses

    ce, z = token_losses(jax.numpy.asarray(logits), jax.numpy.asarray([[0, 1]]), jax.numpy.asarray([[1.0, 0.0]]))
    assert float(ce) == pytest.approx(-np.log(0.7), abs=1e-6)
    assert float(z) == pytest.approx(0.0, abs=1e-6)  # probabilities already normalised: log Z = 0


def test_loss_gradients_match_torch(rng):
    """The cross-entropy and z-loss's hand-written backward (one pass over the logits) against torch's autograd
    of F.cross_entropy and logsumexp, with loss weights that drop some tokens and scale others."""
    from mellama_jax.train.step import token_losses

    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    weights = np.array([[1, 1, 0, 1, 0.5], [0, 1, 1, 1, 2]], np.float32)
    a, b = 0.7, 1e-2  # weights of the two sums in the total

    def total(x):
        ce, z = token_losses(x, jax.numpy.asarray(targets), jax.numpy.asarray(weights))
        return a * ce + b * z

    ours = np.asarray(jax.grad(total)(jax.numpy.asarray(logits)))
    x = torch.tensor(logits, requires_grad=True)
    w = torch.tensor(weights)
    ce = torch.nn.functional.cross_entropy(x.reshape(-1, 11), torch.tensor(targets).reshape(-1), reduction="none")
    z = torch.logsumexp(x, dim=-1).reshape(-1) ** 2
    (a * (ce * w.reshape(-1)).sum() + b * (z * w.reshape(-1)).sum()).backward()
    np.testing.assert_allclose(ours, x.grad.numpy(), atol=1e-6)
    assert float(total(jax.numpy.asarray(logits))) == pytest.approx(
        float(a * (ce * w.reshape(-1)).sum() + b * (z * w.reshape(-1)).sum()), rel=1e-6
    )


def test_schedule_matches_transformers_cosine_with_warmup():
    cfg = OptimizerConfig(learning_rate=8e-6, warmup_ratio=0.05)
    total = 200
    ours = learning_rate_schedule(cfg, total)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=8e-6)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=total)
    for step in range(total):
        assert float(ours(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5, abs=1e-12), step
        opt.step()
        hf.step()


def test_cosine_schedule_ends_at_its_floor():
    """min_lr_ratio 0.1, by hand: warmup of 10 steps to 1e-3, then lr = 1e-4 + (1e-3 - 1e-4) (1 + cos(pi t / 90)) / 2
    over the remaining 90 steps: half way (t = 45) 5.5e-4, at the end exactly the floor 1e-4."""
    ours = learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1), 100)
    assert float(ours(10)) == pytest.approx(1e-3)
    assert float(ours(55)) == pytest.approx(5.5e-4, rel=1e-5)
    assert float(ours(100)) == pytest.approx(1e-4, rel=1e-5)


def test_weight_decay_spares_norms():
    from mellama_jax.model import init_abstract
    from mellama_jax.train.optimizer import decay_mask

    params = nnx.state(init_abstract(load_model_preset("tiny")), nnx.Param)
    mask = {path: v.get_value() for path, v in nnx.to_flat_state(decay_mask(params))}
    assert mask[("norm", "scale")] is False and mask[("layers", "attn_norm", "scale")] is False
    assert mask[("layers", "attn", "wq", "kernel")] is True and mask[("embed", "embedding")] is True


def test_flops_per_token_by_hand():
    cfg = load_model_preset("llama2-7b")
    # 7B: all parameters but the input embedding (32000*4096) and the 65 norm vectors are matmul weights.
    assert flops.matmul_params(cfg) == 6_738_415_616 - 32000 * 4096 - 65 * 4096
    per_token = flops.train_flops_per_token(cfg, 4096)
    assert per_token == 6 * flops.matmul_params(cfg) + 3 * 32 * 4 * 4096 * 4096 / 2
    assert flops.mfu(cfg, 4096, 1000.0, 1e12, 2) == pytest.approx(per_token * 1000 / 2e12)


def test_activation_constraints_reach_the_program(batches):
    _, _, state, trainer = run_steps(LAYOUTS["fsdp4_tensor2"], batches[:1])
    from mellama_jax.train.step import make_train_step

    step = make_train_step(trainer)
    with jax.set_mesh(trainer.mesh):
        text = step.jitted.lower(state, nnx.State({}), trainer.shard_batch(batches[0])).as_text()
    constraints = [line for line in text.splitlines() if "sdy.sharding_constraint" in line]
    hidden = [c for c in constraints if '[{"data", "fsdp"}, {}, {}]> : tensor<8x16x64xf32>' in c]
    heads = [c for c in constraints if '[{"data", "fsdp"}, {}, {"tensor"}, {}]> : tensor<8x16x4x16xf32>' in c]
    assert len(hidden) >= 2 and len(heads) >= 1, constraints


def test_70b_init_is_sharded_at_creation():
    """XLA's own memory analysis of the jitted init: each of 8 devices outputs 1/8 of params + Adam moments."""
    from mellama_jax.train.step import plan_trainer

    cfg = load_config(None, ["model=llama2-70b", "mesh.ici={data: 1, fsdp: 8, tensor: 1}"])
    trainer, init = plan_trainer(cfg)
    with jax.set_mesh(trainer.mesh):
        compiled = init.lower().compile()
    per_device = compiled.memory_analysis().output_size_in_bytes
    whole = 68_976_648_192 * 4 * 3  # fp32 parameters, mu and nu
    assert whole / 8 <= per_device < whole / 8 * 1.001


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
    """(lhs, rhs) dtypes of every dot_general in a jaxpr, sub-jaxprs (scan, remat, custom_vjp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_operand_dtypes(inner)
    return found


@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4, dropout=0.0, targets=LORA_TARGETS)], ids=["full", "lora"])
def test_bf16_gradients_run_every_matmul_on_bf16_operands(monkeypatch, lora):
    """In bf16 compute every matmul of forward and backward multiplies bf16 by bf16 (fp32 accumulation) on an
    accelerator: none is promoted to fp32, which on an H100 had turned the backward pass into TF32 and doubled the
    step time. On the CPU the gradients' operands are fp32 copies (XLA CPU lacks some bf16 dots): the jitted
    gradients run, are fp32 for the fp32 master weights, and are close to the fp32 model's. With LoRA adapters
    on every projection (B made non-zero, so every factor has a gradient) the same holds for the adapters'."""
    from mellama_jax.model import Llama, layers

    cfg = dataclasses.replace(load_model_preset("tiny-gqa"), dtype="bfloat16", remat="full")

    def model_of(cfg):
        model = Llama(cfg, rngs=nnx.Rngs(0), lora=lora)
        for i, module in enumerate(m for _, m in nnx.iter_modules(model) if getattr(m, "lora_b", None) is not None):
            module.lora_b.set_value(jax.random.normal(jax.random.key(i), module.lora_b.shape) * 0.1)
        return model

    graphdef, params = nnx.split(model_of(cfg))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 9)))

    def nll(graphdef, params):
        logits = nnx.merge(graphdef, params)(ids[:, :-1]).astype(jnp.float32)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()

    def loss(params):
        return nll(graphdef, params)

    on_cpu = jax.jit(jax.grad(loss))(params)
    assert {x.dtype for x in jax.tree.leaves(on_cpu)} == {jnp.dtype(jnp.float32)}  # fp32 master weights' grads
    graphdef32, params32 = nnx.split(model_of(dataclasses.replace(cfg, dtype="float32")))
    fp32 = jax.grad(lambda p: nll(graphdef32, p))(params32)
    for a, b in zip(jax.tree.leaves(on_cpu), jax.tree.leaves(fp32)):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.05
    monkeypatch.setattr(layers, "gradient_operand_dtype", jnp.dtype)  # as on a GPU/TPU
    dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    # forward and both gradients of 7 projections and 2 attention products; each adapter's 2 + 4 more
    assert len(dots) >= 3 * (7 + 2) + 3 + (6 * 7 if lora else 0)
    assert set(dots) == {("bfloat16", "bfloat16")}, dots


def test_step_reports_documents_per_row(batches):
    """The most documents in any row of the global batch (runs of equal segment ids, padding included): what
    cudnn attention weighs against model.max_segments. Rows sharded over 8 devices; one row made to hold six."""
    from train_helpers import TINY

    from mellama_jax import sharding
    from mellama_jax.train.step import build_trainer, make_train_step

    batch = {k: np.array(v) for k, v in batches[0].items()}
    batch["segment_ids"][5] = np.repeat([1, 2, 3, 4, 5, 0], [3, 3, 2, 3, 3, 2])
    seg = batch["segment_ids"]
    by_hand = max(1 + int(np.sum(row[1:] != row[:-1])) for row in seg)
    assert by_hand == 6
    cfg = load_config(None, TINY + ["mesh.ici={data: 8, fsdp: 1, tensor: 1}"])
    trainer, state, frozen = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    _, metrics = make_train_step(trainer)(state, frozen, trainer.shard_batch(batch))
    assert int(metrics["documents_per_row_max"]) == 6


def _capture_gradients() -> optax.GradientTransformation:
    """An 'optimizer' that keeps the gradient it is given as its state, exactly, and leaves the parameters."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def _applied_gradient(rows: int, grad_accum: int, batch: dict):
    """The gradient a train step applies, read off as the new state of `_capture_gradients` standing in for the
    optimizer; one device. Returns it with the step's logged gradient norm, the initial parameters and trainer."""
    from mellama_jax import sharding
    from mellama_jax.train.step import build_trainer, make_train_step

    cfg = load_config(
        None,
        [
            "model=tiny-gqa",
            "train.seq_len=16",
            f"train.batch_size={rows}",
            "train.steps=4",
            f"train.grad_accum={grad_accum}",
            "mesh.ici={data: 1, fsdp: 1, tensor: 1}",
        ],
    )
    trainer, state, frozen = build_trainer(cfg, sharding.make_mesh(cfg.mesh, single_device()))
    capture = _capture_gradients()
    trainer = dataclasses.replace(
        trainer, tx=capture, state_shardings=trainer.state_shardings._replace(opt_state=trainer.state_shardings.params)
    )
    params = jax.tree.map(np.asarray, state.params)
    state = state._replace(opt_state=capture.init(state.params))
    after, metrics = make_train_step(trainer)(state, frozen, trainer.shard_batch(batch))
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64), after.opt_state)
    _applied_gradient.logged_loss = float(metrics["loss"])
    return grads, float(metrics["grad_norm"]), params, trainer, frozen


def test_accumulated_gradients_equal_the_big_batch_gradient(batches):
    """The gradients themselves (and the logged gradient norm), not only the loss and an Adam step, whose
    first update hardly depends on the gradient's scale: 4 microbatches of 4 rows against autodiff of the mean
    weighted token cross-entropy over the whole 16-row batch, written out here with optax's cross-entropy."""
    big = {k: np.concatenate([b[k] for b in batches[:2]]) for k in batches[0]}
    grads, grad_norm, params, trainer, frozen = _applied_gradient(16, 4, big)
    b = {k: jnp.asarray(v) for k, v in big.items()}

    def mean_loss(params):
        logits = trainer.model(params, frozen)(b["inputs"], b["positions"], b["segment_ids"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
        return jnp.sum(nll * b["loss_weights"]) / jnp.sum(b["loss_weights"])

    ref = jax.jit(jax.grad(mean_loss))(jax.tree.map(jnp.asarray, params))
    ref = dict(nnx.to_flat_state(jax.tree.map(lambda g: np.asarray(g, np.float64), ref)))
    for path, g in nnx.to_flat_state(grads):
        r = ref[path].get_value()
        assert np.linalg.norm(g.get_value() - r) <= 1e-5 * np.linalg.norm(r), path
    ref_norm = float(np.sqrt(sum(np.sum(np.square(v.get_value())) for v in ref.values())))
    assert grad_norm == pytest.approx(ref_norm, rel=1e-5)
    # the loss the step logs is the whole batch's mean, not one microbatch's nor their sum
    assert _applied_gradient.logged_loss == pytest.approx(float(mean_loss(jax.tree.map(jnp.asarray, params))), rel=1e-6)


def test_lora_dropout_scales_the_kept_inputs():
    """Inverted dropout, as PEFT's torch.nn.Dropout: a kept input is divided by 1 - p, a dropped one is 0, and
    about p of them are dropped. With A = B = identity and a zero kernel the output is the dropped input itself."""
    from mellama_jax.model.layers import Dense

    D, p = 32, 0.25
    dense = Dense(
        (D,),
        (D,),
        ("embed", "mlp"),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std=0.02,
        rngs=nnx.Rngs(0),
        lora_rank=D,
        lora_scale=1.0,
        lora_dropout=p,
    )
    dense.kernel.set_value(jnp.zeros((D, D)))
    dense.lora_a.set_value(jnp.eye(D))
    dense.lora_b.set_value(jnp.eye(D))
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (256, D)), jnp.float32)
    y = np.asarray(dense(x, dropout_rng=jax.random.key(3)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - p), rtol=1e-6)
    n = y.size  # binomial: the dropped share within 5 standard deviations of p
    assert abs((~kept).mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(np.asarray(dense(x)), np.asarray(x))  # no key: no dropout (evaluation)


def test_lora_dropout_masks_differ_between_projections():
    """Two adapted projections of one layer (lora_id 0 and 1: wq and wk) with the same weights, input and step key
    must drop different inputs (PEFT gives each adapter its own Dropout): the dropped positions differ, while a
    projection asked twice drops the same ones."""
    from mellama_jax.model.layers import Dense

    D = 32

    def projection(lora_id):
        dense = Dense(
            (D,),
            (D,),
            ("embed", "mlp"),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            init_std=0.02,
            rngs=nnx.Rngs(0),
            lora_rank=D,
            lora_scale=1.0,
            lora_dropout=0.5,
            lora_id=lora_id,
        )
        dense.kernel.set_value(jnp.zeros((D, D)))
        dense.lora_a.set_value(jnp.eye(D))
        dense.lora_b.set_value(jnp.eye(D))
        return dense

    x, key = jnp.ones((8, D), jnp.float32), jax.random.key(7)
    wq, wk = (np.asarray(projection(i)(x, dropout_rng=key)) == 0 for i in (0, 1))
    assert (wq != wk).any() and (wq == (np.asarray(projection(0)(x, dropout_rng=key)) == 0)).all()


def test_lora_dropout_draws_a_new_mask_every_step():
    """The same batch from the same parameters at steps 0 and 1: with dropout the masks, and so the losses,
    differ; without it they are equal (the control), and a step repeated gives the same loss (resumable)."""
    from mellama_jax import sharding
    from mellama_jax.train.step import build_trainer, make_train_step

    batch = synthetic_batch(np.random.default_rng(5), 4, 16, 256)
    losses = {}
    for dropout in (0.0, 0.3):
        cfg = load_config(
            None,
            [
                "model=tiny-gqa",
                "train.seq_len=16",
                "train.batch_size=4",
                "train.steps=4",
                "train.mode=lora",
                f"lora.dropout={dropout}",
                "lora.base_dtype=float32",
                "mesh.ici={data: 1, fsdp: 1, tensor: 1}",
            ],
        )
        trainer, state, frozen = build_trainer(cfg, sharding.make_mesh(cfg.mesh, single_device()))
        # B = 0 at init: give the adapters a value, so that their input's mask reaches the loss
        state = state._replace(params=jax.tree.map(lambda v: v + 0.05, state.params))
        step, sharded = make_train_step(trainer), trainer.shard_batch(batch)
        losses[dropout] = [
            float(step(jax.tree.map(jnp.copy, state._replace(step=jnp.int32(k))), frozen, sharded)[1]["loss"])
            for k in (0, 1, 0)
        ]
    assert losses[0.0][0] == losses[0.0][1] == losses[0.0][2]
    assert losses[0.3][0] != losses[0.3][1] and losses[0.3][0] == losses[0.3][2]


@pytest.mark.slow  # 23 s; the guard's side is in the default suite (test_train_hooks)
def test_a_non_finite_step_is_skipped_and_the_run_goes_on(batches):
    """A planted NaN batch (its loss weights): the update is skipped, parameters and optimizer state bit-equal to
    before it, `skipped` = 1; the next batch trains as usual. With skipping off the NaN reaches the parameters."""
    from mellama_jax import sharding
    from mellama_jax.train.step import build_trainer, make_train_step

    bad = dict(batches[1], loss_weights=np.where(batches[1]["loss_weights"] > 0, np.nan, 0).astype(np.float32))
    for skip in (True, False):
        cfg = load_config(
            None,
            [
                "model=tiny-gqa",
                "train.seq_len=16",
                "train.batch_size=8",
                "train.steps=4",
                f"train.skip_nonfinite={str(skip).lower()}",
                "mesh.ici={data: 1, fsdp: 1, tensor: 1}",
            ],
        )
        trainer, state, frozen = build_trainer(cfg, sharding.make_mesh(cfg.mesh, single_device()))
        step = make_train_step(trainer)
        state, m0 = step(state, frozen, trainer.shard_batch(batches[0]))
        before = jax.tree.map(np.asarray, (state.params, state.opt_state))
        state, m1 = step(state, frozen, trainer.shard_batch(bad))
        after = jax.tree.map(np.asarray, (state.params, state.opt_state))
        finite = all(np.isfinite(x).all() for x in jax.tree.leaves(after[0]))
        if skip:
            assert int(m0["skipped"]) == 0 and int(m1["skipped"]) == 1 and int(state.step) == 2
            jax.tree.map(np.testing.assert_array_equal, after, before)
            state, m2 = step(state, frozen, trainer.shard_batch(batches[2]))
            assert int(m2["skipped"]) == 0 and np.isfinite(float(m2["loss"]))
            assert any(
                (np.asarray(a) != b).any() for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before[0]))
            )
        else:
            assert int(m1["skipped"]) == 0 and not finite
