"""YAML configs, overrides and the errors a user sees for bad ones."""

import pytest

from mellama_jax.config import Config, ConfigError, load_config, load_model_preset


def test_defaults_are_llama2_7b_numerics():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.rms_norm_eps == 1e-5 and cfg.model.rope_theta == 1e4 and cfg.model.vocab_size == 32000


def test_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: llama2-70b\n  dtype: bfloat16\nmesh:\n  ici: {fsdp: -1, tensor: 8}\n")
    cfg = load_config(path, ["model.remat=full", "mesh.ici.data=2", "seed=7"])
    assert cfg.model.num_kv_heads == 8 and cfg.model.hidden_size == 8192
    assert cfg.model.dtype == "bfloat16" and cfg.model.remat == "full"
    assert cfg.mesh.ici == {"data": 2, "fsdp": -1, "tensor": 8}
    assert cfg.seed == 7
    assert load_config(None, ["model=tiny"]).model.name == "tiny"
    assert load_config(None, ["model.preset=tiny-gqa"]).model.num_kv_heads == 2


@pytest.mark.parametrize("text, overrides, message", [
    ("model: {preset: tiny, hidden_sise: 3}\n", [], "unknown key(s) ['hidden_sise']"),
    ("model: {preset: tiny}\n", ["model.num_layers=two"], "model.num_layers: expected an integer"),
    ("model: {preset: tiny}\n", ["model.dtype=float8"], "model.dtype must be one of"),
    ("model: {preset: tiny, num_kv_heads: 3}\n", [], "not a multiple of num_kv_heads=3"),
    ("model: {preset: nosuch}\n", [], "unknown model preset 'nosuch'"),
    ("model: [1, 2\n", [], "invalid YAML"),
    ("- 1\n", [], "top level must be a mapping"),
    ("mesh: {ici: {fsdp: -1, tensor: -1}}\n", [], "at most one axis may be -1"),
    ("mesh: {rules: [[embed, fsdq]]}\n", [], "names mesh axes ['fsdq']"),
    ("model: {preset: tiny}\n", ["model.remat"], "not of the form key=value"),
])
def test_bad_configs_name_the_problem(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: [1]\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_presets_are_data():
    cfg = load_model_preset("llama2-13b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (5120, 40, 40, 128)
