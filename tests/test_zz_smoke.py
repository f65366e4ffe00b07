import subprocess, sys, os
from mellama_jax import storage
def test_smoke(bucket, demo_data, tmp_path):
    storage.upload(demo_data / "pre", f"{bucket}/data/pre")
    r = subprocess.run([sys.executable, "-m", "mellama_jax.cli", "train", "--config", "tiny-pretrain",
        f"run.dir={bucket}/run", f"data.path={bucket}/data/pre", "train.steps=6", "checkpoint.every=3", "run.progress=false"],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    print(r.stdout[-3000:], r.stderr[-5000:])
    assert r.returncode == 0
    print([str(p) for p in storage.path(f"{bucket}/run").iterdir()])
    print(storage.path(f"{bucket}/run/summary.json").read_text())
