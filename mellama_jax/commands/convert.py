"""convert hf-to-jax, jax-to-hf, verify."""

from __future__ import annotations

import json

from mellama_jax.convert import api
from mellama_jax.convert.verify import VerifyRequest, verify
from mellama_jax.options import command


@command(api.ImportRequest)
def hf_to_jax(r: api.ImportRequest) -> int:
    print(api.hf_to_jax(r))
    return 0


@command(api.ExportRequest)
def jax_to_hf(r: api.ExportRequest) -> int:
    print(api.jax_to_hf(r))
    return 0


@command(VerifyRequest)
def check(r: VerifyRequest) -> int:
    report = verify(r)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1
