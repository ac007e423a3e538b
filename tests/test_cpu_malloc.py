"""The page-fault cliff of CPU decoding: with glibc's thresholds fixed (done when an engine
is built on the CPU), steady-state decode attention at ~1.1k tokens makes no system calls
and no page faults. Run in fresh processes, as malloc's state is per process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys, torch
from thinfer.attention.torch_paged import decode_attention
if sys.argv[1] == "tuned":
    from thinfer.engine.cpu_malloc import tune_malloc_for_decode
    assert tune_malloc_for_decode()
torch.set_num_threads(1)
B, Hq, Hkv, D, bs = 4, 9, 3, 64, 16  # SmolLM2's attention at batch 4
k, v = torch.randn(400, bs, Hkv, D), torch.randn(400, bs, Hkv, D)
perm, q = torch.randperm(400), torch.randn(B, Hq, D)

def decode(first, last):  # contexts growing one token per step, a few layers each
    for ctx in range(first, last):
        nb = (ctx + bs - 1) // bs
        for _ in range(4):
            decode_attention(q, k, v, perm[: nb * B].view(B, nb), torch.full((B,), ctx), ctx, 0.125)

decode(900, 1000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
decode(1000, 1200)  # where the cliff was
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 800))
"""


def _faults(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_keeps_decode_attention_off_the_page_fault_path():
    faults = _faults("tuned")  # by default (glibc's moving thresholds): 80-1700 per call
    assert faults < 10, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_engines_on_the_cpu_tune_malloc():
    from thinfer import LLM
    from thinfer.engine import cpu_malloc

    LLM(model="tiny", load_format="dummy", device="cpu", num_kv_blocks=8)
    assert cpu_malloc._tuned is True
