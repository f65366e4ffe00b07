"""The rule table maps the model's logical names to mesh axes; the mesh comes from the config."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mellama_jax import sharding
from mellama_jax.config import ConfigError, MeshConfig, load_config
from mellama_jax.model import init_abstract


def test_mesh_from_config_resolves_the_rest():
    mesh = sharding.make_mesh(MeshConfig(ici={"data": 2, "fsdp": -1, "tensor": 2}))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="has 6 devices, but 8"):
        sharding.make_mesh(MeshConfig(ici={"data": 3, "fsdp": 1, "tensor": 2}))


def test_default_rules_follow_maxtext():
    rules = MeshConfig().rules
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules) == P(None, "fsdp", "tensor", None)
    assert sharding.logical_to_spec(("embed", "vocab"), rules) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", None), rules) == P(("data", "fsdp"), None)


def test_parameter_shardings_follow_the_rule_table():
    cfg = load_config(None, ["model=tiny-gqa", "mesh.ici.fsdp=4", "mesh.ici.tensor=2"])
    mesh = sharding.make_mesh(cfg.mesh)
    state = nnx.state(init_abstract(cfg.model), nnx.Param)
    shard = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh, cfg.mesh.rules)))
    assert shard[("layers", "attn", "wq", "kernel")].get_value().spec == P(None, "fsdp", "tensor", None)
    assert shard[("layers", "mlp", "w_down", "kernel")].get_value().spec == P(None, "tensor", "fsdp")
    assert shard[("embed", "embedding")].get_value().spec == P("tensor", "fsdp")
    # A different layout is a config change only.
    cfg2 = load_config(None, ["model=tiny-gqa", "mesh.rules=[[embed, tensor], [mlp, fsdp]]"])
    shard2 = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh, cfg2.mesh.rules)))
    assert shard2[("layers", "mlp", "w_down", "kernel")].get_value().spec == P(None, "fsdp", "tensor")


def test_indivisible_layout_is_a_clear_error():
    cfg = load_config(None, ["model=tiny-gqa", "mesh.ici.fsdp=1", "mesh.ici.tensor=8"])
    mesh = sharding.make_mesh(cfg.mesh)
    state = nnx.state(init_abstract(cfg.model), nnx.Param)
    with pytest.raises(
        ConfigError, match=r"layers/attn/w[kq]/kernel: dimension [24] .* mesh axes \('tensor',\) of size 8"
    ):
        sharding.state_shardings(state, mesh, cfg.mesh.rules)


def test_bytes_per_device_of_70b_on_8_devices():
    cfg = load_config(None, ["model=llama2-70b"])
    mesh = sharding.make_mesh(cfg.mesh)
    assert jax.device_count() == 8
    state = nnx.state(init_abstract(cfg.model), nnx.Param)
    per_device = sharding.bytes_per_device(state, sharding.state_shardings(state, mesh, cfg.mesh.rules))
    # fsdp=8 splits every matrix 8 ways; only the (small) norm scales are replicated.
    norms = (2 * 80 + 1) * 8192 * 4
    assert per_device == (68_976_648_192 * 4 - norms) // 8 + norms


def test_layouts_put_tpu_slices_on_data_parallelism():
    """`plan --slices S` / a multi-slice layout: inside a slice the given layout, across slices plain data
    parallelism over the data-center network (each slice holds a whole replica; only gradients cross slices)."""
    cfg = load_config(None, sharding.layout_overrides("fsdp=4,tensor=2", slices=3))
    assert cfg.mesh.ici == {"data": 1, "fsdp": 4, "tensor": 2}
    assert cfg.mesh.dcn == {"data": 3, "fsdp": 1, "tensor": 1}
    assert load_config(None, sharding.layout_overrides("data=8")).mesh.dcn == {"data": 1, "fsdp": 1, "tensor": 1}


def test_ici_minus_one_takes_one_hosts_share_of_the_devices():
    """16 devices over 2 hosts (dcn data=2): ici's -1 is what is left of one host's 8 devices, here fsdp 4 beside
    tensor 2; an ici asking for all 16 is refused, naming the 8 available to it."""
    cfg = MeshConfig(ici={"data": 1, "fsdp": -1, "tensor": 2}, dcn={"data": 2, "fsdp": 1, "tensor": 1})
    assert sharding.mesh_shape(cfg, 16, 2) == ({"data": 1, "fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 1, "tensor": 1})
    with pytest.raises(ConfigError, match="16 devices, but 8 are available"):
        sharding.mesh_shape(MeshConfig(ici={"data": 1, "fsdp": 8, "tensor": 2}, dcn=cfg.dcn), 16, 2)


def test_a_dimension_must_divide_not_merely_exceed_the_mesh_axis():
    """12 rows over an 8-way fsdp axis: larger than 8, but 12 % 8 = 4, so it is refused naming the parameter;
    16 divides."""
    mesh = sharding.make_mesh(MeshConfig(ici={"data": 1, "fsdp": 8, "tensor": 1}))
    rules = MeshConfig().rules
    with pytest.raises(ConfigError, match="w: dimension 12 .* does not divide over mesh axes"):
        sharding.named_sharding(mesh, ("embed", None), rules, (12, 4), "w")
    assert sharding.named_sharding(mesh, ("embed", None), rules, (16, 4), "w").shard_shape((16, 4)) == (2, 4)
