"""The Triton kernel on CUDA (xseqloss/backends/torch/triton.py, issue 15): every option in float32,
float16 and bfloat16 against the float64 reference, p(y) -> 1 in bfloat16, logits near 1e4 and 3e4,
in place with its version bump (and Liger-Kernel issue 272's pattern), and rows past 2**31 elements
(64-bit offsets).

These run where torch sees CUDA and triton is installed, and skip otherwise; benchmarks/gpu.sh runs
this file with pytest on the GPU machine (its result goes into OUTDIR beside the benchmarks). The
float64 reference and the tolerances are tests/helpers/triton_kernel_script.py's, which checks the
same kernel on CPU through Triton's interpreter (tests/test_triton_kernel.py).

Without CUDA but with TRITON_INTERPRET=1 set before Triton is imported, the same tests run on CPU
tensors through the interpreter at small sizes (the 2**31-element case at 40 x 50: its code path
only). tests/test_gpu_script.py runs this file so in a subprocess, so that a GPU session does not
discover a typo.
"""

import importlib.util
import math
import os

import numpy as np
import pytest

from helpers.support import require_or_skip, required_backends
from helpers.triton_kernel_script import TOL, reference, rel_err

# NaN intermediates of the rows that do not count (Triton's interpreter computes them in NumPy)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def dev():
    """"cuda", or "cpu" through Triton's interpreter when TRITON_INTERPRET=1 and there is no CUDA."""
    require_or_skip("torch")
    import torch
    if torch.cuda.is_available():
        device = "cuda"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu"
    else:
        pytest.skip("CUDA is not available (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("triton") is None:
        if "torch" in required_backends():
            pytest.fail("triton is required with the torch backend (XSEQLOSS_REQUIRE_BACKENDS) but is not "
                        "installed: pip install -c constraints.txt triton", pytrace=False)
        pytest.skip("triton is not installed (pip install -c constraints.txt triton)")
    return device


@pytest.fixture(scope="module")
def gpu(dev):
    return dev == "cuda"


@pytest.fixture(scope="module")
def tt(dev):
    from xseqloss.internals import part
    return part("torch", "triton")


@pytest.fixture
def gen(dev):
    import torch
    return torch.Generator(device=dev).manual_seed(0)


def _np(t):
    """float64 NumPy of a tensor on any device, in any dtype (the reference sees the rounded inputs)."""
    return t.detach().cpu().double().numpy()


def _reference(z, y, keep=None, cw=None, scale=None, eps=0.0, z_loss=0.0, cap=None):
    """helpers/triton_kernel_script.py's float64 reference on tensors: (loss, gradient) as NumPy."""
    return reference(_np(z), y.cpu().numpy(), None if keep is None else keep.cpu().numpy(),
                     None if cw is None else _np(cw), None if scale is None else _np(scale),
                     eps=eps, z_loss=z_loss, cap=cap)


def _err(loss, grad, ref):
    return max(rel_err(_np(loss), ref[0]), rel_err(_np(grad), ref[1]))


def _dtype(name):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def test_options_against_float64(dev, gpu, tt, gen, record_property):
    # each (variant, dtype, BLOCK) is one Triton compile (~1 s): every dtype with no option and
    # with all of them, float32 also with a few subsets; C = 7 (one partial block), 4097 and
    # 32000 (blocks of 4096 with a partial last one), C = 1 once
    import torch
    worst = {}
    for C in ((1, 7, 4097, 32000) if gpu else (1, 7, 65, 200)):
        R = 37 if gpu else 7
        for dt in (("float32",) if C == 1 else ("float32", "float16", "bfloat16")):
            z = (torch.randn((R, C), generator=gen, device=dev) * 3).to(_dtype(dt))
            y = torch.randint(0, C, (R,), generator=gen, device=dev)
            keep = torch.rand((R,), generator=gen, device=dev) > 0.3
            zg = z.clone()
            zg[~keep] = float("nan")  # garbage in the rows that do not count
            cw = torch.rand((C,), generator=gen, device=dev) + 0.1
            cw[::5] = 0
            scale = torch.randn((R,), generator=gen, device=dev)
            sets = [dict(keep=keep, cw=cw, scale=scale, eps=0.1, z_loss=0.01, cap=5.0)]
            if C > 1:
                sets.append(dict())
            if dt == "float32" and C > 1:
                sets += [dict(eps=0.2), dict(cw=cw, z_loss=1e-3)]
            for opts in sets:
                kw = dict(keep=None, cw=None, scale=None, eps=0.0, z_loss=0.0, cap=None)
                kw.update(opts)
                zz = zg if kw["keep"] is not None else z
                out = torch.empty_like(zz)
                loss = tt.token_loss_triton(zz, y, kw["keep"], kw["cw"], kw["scale"], eps=kw["eps"],
                                            z_loss=kw["z_loss"], cap=kw["cap"], out=out)
                e = _err(loss, out, _reference(zz, y, **kw))
                worst[dt] = max(worst.get(dt, 0.0), e)
                assert e <= TOL[dt], f"C={C} {dt} {sorted(opts)}: err {e:.3g} > {TOL[dt]}"
    record_property("detail", "max err " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))


def test_true_class_gradient_bfloat16_p_to_1(dev, gpu, tt, record_property):
    import torch
    C, out = (32000 if gpu else 200), []
    block = tt.launch_config(C, dev)[0]
    for p in (0.9, 0.99, 0.999):
        L = math.log(p * (C - 1) / (1 - p))
        z = torch.zeros((4, C), device=dev)
        y = torch.tensor([0, block - 1, block, C - 1], device=dev)
        z[torch.arange(4), y] = L
        zb = z.bfloat16()
        g = torch.empty_like(zb)
        tt.token_loss_triton(zb, y, None, None, None, eps=0.0, z_loss=0.0, cap=None, out=g)
        _, rg = _reference(zb, y)
        rows, cols = np.arange(4), y.cpu().numpy()
        got, want = _np(g)[rows, cols], rg[rows, cols]
        rel = float((np.abs(got - want) / np.abs(want)).max())
        assert rel <= 0.01, f"p={p}: {rel:.3g}"
        out.append(f"p={p}: {rel:.2g}")
    record_property("detail", "true-class gradient relative error " + ", ".join(out))


def test_large_logits(dev, gpu, tt, gen, record_property):
    import torch
    z = torch.tensor([[10000.0, 9999.0, -10000.0]], device=dev)
    loss = tt.token_loss_triton(z, torch.tensor([0], device=dev), None, None, None, eps=0.0, z_loss=0.0,
                                cap=None, out=None)
    exact = math.log1p(math.exp(-1.0))
    first = loss.item()
    assert abs(first - exact) <= 1.2e-7, f"{first!r} vs {exact!r}"
    zc = 3e4 + torch.randn((64, 32000) if gpu else (8, 200), generator=gen, device=dev)
    y = zc.argmax(1)
    out = torch.empty_like(zc)
    loss = tt.token_loss_triton(zc, y, None, None, None, eps=0.1, z_loss=0.0, cap=None, out=out)
    e = _err(loss, out, _reference(zc, y, eps=0.1))
    assert e <= 1e-5, f"3e4 rows: {e:.3g}"
    record_property("detail", f"[1e4, 9999, -1e4] -> {first:.7f} (exact {exact:.7f}); rows near 3e4 (eps 0.1): "
                              f"err {e:.2g}")


def test_in_place_and_version_counter(dev, gpu, tt, gen):
    import torch
    R, C = (33, 5000) if gpu else (5, 300)
    z = torch.randn((R, C), generator=gen, device=dev).bfloat16()
    y = torch.randint(0, C, (R,), generator=gen, device=dev)
    g = torch.empty_like(z)
    l1 = tt.token_loss_triton(z, y, None, None, None, eps=0.1, z_loss=0.0, cap=None, out=g)
    v0 = z._version
    l2 = tt.token_loss_triton(z, y, None, None, None, eps=0.1, z_loss=0.0, cap=None, out=z)
    assert torch.equal(z, g) and torch.equal(l1, l2), "in place differs from out of place"
    assert z._version > v0, "version counter not bumped"
    # Liger-Kernel issue 272's pattern: writing into a tensor autograd saved must make backward raise
    h = torch.randn((4, 9), device=dev, requires_grad=True)
    p = torch.softmax(h, -1)
    tt.token_loss_triton(p.detach(), torch.zeros(4, dtype=torch.int64, device=dev), None, None, None, eps=0.0,
                         z_loss=0.0, cap=None, out=p.detach())
    with pytest.raises(RuntimeError, match="inplace"):
        p.sum().backward()


def test_64bit_offsets_past_2_31_elements(dev, gpu, tt, gen, record_property):
    """R x C past 2**31 elements: the last rows start beyond int32 offsets (on CPU through the
    interpreter: 40 x 50, the code path only, not 8 GB)."""
    import torch
    C, R = (32000, (1 << 31) // 32000 + 4) if gpu else (50, 40)
    z = torch.empty((R, C), device=dev, dtype=torch.bfloat16)
    z[:-8].zero_()
    tail = (torch.randn((8, C), generator=gen, device=dev) * 3).bfloat16()
    z[-8:] = tail
    y = torch.zeros(R, dtype=torch.int64, device=dev)
    y[-8:] = torch.randint(0, C, (8,), generator=gen, device=dev)
    loss = tt.token_loss_triton(z, y, None, None, None, eps=0.0, z_loss=0.0, cap=None, out=z)  # in place
    e = _err(loss[-8:], z[-8:], _reference(tail, y[-8:]))
    assert e <= 2e-2, f"rows past 2**31 elements: err {e:.3g}"
    first = loss[0].item()
    assert abs(first - math.log(C)) < 1e-3, first
    del z
    if gpu:
        torch.cuda.empty_cache()
    record_property("detail", f"{R} x {C} = {R * C / 2**31:.3f} * 2**31 elements (in place): last rows err {e:.2g}")
