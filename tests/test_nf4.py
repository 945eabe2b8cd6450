"""The one-launch NF4 dequantization kernel (`lorakit.ops.nf4`) against bitsandbytes'.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess, since
Triton reads it when a kernel is defined); on a GPU, compiled. The reference is bitsandbytes' own
dequantization: bit for bit on the GPU; on the CPU, bit for bit for float32 and float16 weights,
and for bfloat16 within one unit in the last place, since the interpreter rounds float32 to
bfloat16 toward zero where the GPU rounds to nearest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("triton")

CHECK = r"""
import json, logging, sys, torch
logging.getLogger("bitsandbytes").setLevel(logging.CRITICAL)
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from lorakit.ops.nf4 import dequantize_nf4, supports
device = sys.argv[1]
out = []
for nested in (False, True):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, blocksize in (((96, 320), 64), ((40, 256), 128), ((7, 64), 64)):
            torch.manual_seed(0)
            w = (torch.randn(shape) * 0.05).to(dtype).to(device)
            q, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
            absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset if nested else st.absmax
            # bitsandbytes' reference formula (its CUDA kernel's: the product in float32, rounded once)
            want = _dequantize_4bit_compute(q.reshape(-1).view(torch.uint8), absmax.float(), st.code, st.blocksize,
                                            st.shape, st.dtype)
            got = dequantize_nf4(q, st)
            theirs = F.dequantize_4bit(q, st)
            ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
            out.append({"nested": nested, "dtype": str(dtype), "shape": list(shape), "supports": supports(q, st),
                        "got_shape": list(got.shape), "got_dtype": str(got.dtype),
                        "equal": torch.equal(got, want), "equal_bnb": torch.equal(got, theirs),
                        "within_ulp": bool(((got.float() - want.float()).abs() <= ulp).all())})
print(json.dumps(out))
"""


def _run(device: str, interpret: bool) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", CHECK, device], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_kernel_is_bitsandbytes_dequantization_under_the_interpreter():
    rows = _run("cpu", interpret=True)
    assert len(rows) == 18
    for r in rows:
        assert r["supports"] and r["got_shape"] == r["shape"] and r["got_dtype"] == r["dtype"], r
        if r["dtype"] == "torch.bfloat16":
            assert r["within_ulp"], r  # the interpreter truncates to bf16
        else:
            assert r["equal"], r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_compiled_kernel_is_bitsandbytes_dequantization_to_the_bit():
    for r in _run("cuda", interpret=False):
        assert r["equal"] and r["equal_bnb"], r


def test_fp4_and_cpu_repacked_layouts_are_left_to_bitsandbytes():
    import bitsandbytes.functional as F

    from lorakit.ops.nf4 import supports

    w = torch.randn(64, 128)
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert not supports(q, st)
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert supports(q, st)
    st.packing_format_for_cpu = True
    assert not supports(q, st)
