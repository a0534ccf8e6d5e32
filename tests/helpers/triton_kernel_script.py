"""Checks of the Triton kernel (xseqloss/backends/torch/triton.py), run by test_triton_kernel.py in a
subprocess so that the pytest process never imports Triton in interpreter mode.

    python tests/helpers/triton_kernel_script.py interpret   # TRITON_INTERPRET=1 must be set: numeric checks
    python tests/helpers/triton_kernel_script.py compile     # TRITON_INTERPRET unset: ahead-of-time compile for sm_90

Prints one JSON object {check name: {"ok": bool, "detail": str}} as the last line of stdout. Every
check runs even when an earlier one fails; a check that raises is reported as failed with its
traceback.

Its float64 ``reference`` (with ``rel_err`` and ``TOL``) is also the one tests/test_triton_cuda.py
checks the kernel against on CUDA, imported from here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# tolerances on |x - ref| / (1 + |ref|), API.md section 6
TOL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}

RESULTS: dict[str, dict] = {}
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def run_all() -> None:
    for fn in CHECKS:
        name = fn.__name__.removeprefix("check_")
        try:
            detail = fn()
            RESULTS[name] = {"ok": True, "detail": detail or ""}
        except Exception:
            RESULTS[name] = {"ok": False, "detail": traceback.format_exc()[-3000:]}


# ------------------------------------------------------------------------------ the float64 reference

def reference(z, y, keep=None, cw=None, scale=None, eps=0.0, z_loss=0.0, cap=None):
    """The kernel's formula in float64 NumPy, row by row, written from the spec (not from the kernel):
    loss = sumq * lse_s - sum_c q_c (x_c - m) + z_loss w_y lse^2 with 0 log 0 = 0 per class;
    grad = ((sumq + 2 z_loss w_y lse) softmax - q) (1 - t^2) scale; dropped rows exactly 0."""
    z = np.asarray(z, np.float64)
    R, C = z.shape
    loss = np.zeros(R)
    grad = np.zeros((R, C))
    w = np.ones(C) if cw is None else np.asarray(cw, np.float64)
    with np.errstate(all="ignore"):
        for r in range(R):
            if keep is not None and not keep[r]:
                continue
            x = z[r].copy()
            t = None
            if cap is not None:
                t = np.tanh(x / cap)
                x = cap * t
            m = x.max()
            m = 0.0 if m == -np.inf else m
            e = np.exp(x - m)
            s = e.sum()
            lse_s = np.log(s)
            lse = lse_s + m
            a = (1.0 - eps) * w[y[r]]
            b = eps / C
            q = b * w
            q[y[r]] += a
            sumq = a + b * w.sum()
            terms = np.where(q == 0.0, 0.0, q * (x - m))
            loss[r] = sumq * lse_s - terms.sum() + (z_loss * w[y[r]] * lse * lse if z_loss else 0.0)
            g = (sumq + 2.0 * z_loss * w[y[r]] * lse) * e / s - q
            if t is not None:
                g = g * (1.0 - t * t)
            grad[r] = g * (1.0 if scale is None else float(scale[r]))
    return loss, grad


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    same = (np.isnan(got) & np.isnan(ref)) | (np.isinf(got) & np.isinf(ref) & (np.sign(got) == np.sign(ref)))
    with np.errstate(invalid="ignore"):
        err = np.abs(got - ref) / (1.0 + np.abs(ref))
    err = np.where(same, 0.0, err)
    err = np.where(np.isnan(err), np.inf, err)
    return float(err.max()) if err.size else 0.0


# ---------------------------------------------------------------------------------- interpreter checks

def interpret_checks() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before running this mode"
    import torch
    from xseqloss.internals import part; tt = part("torch", "triton")

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # NaN intermediates of dropped rows
    BLOCK = tt.INTERPRET_MAX_BLOCK
    DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    rng = np.random.default_rng(0)

    def as_np(t):
        return t.detach().float().numpy().astype(np.float64) if t.dtype != torch.float64 else t.numpy()

    def call(z, y, keep=None, cw=None, scale=None, eps=0.0, z_loss=0.0, cap=None, grad=True, out=None):
        if grad and out is None:
            out = torch.empty_like(z)
        loss = tt.token_loss_triton(z, y, keep, cw, scale, eps=eps, z_loss=z_loss, cap=cap,
                                    out=out if grad else None)
        return loss, out

    def inputs(R, C, dtype="float32", spread=3.0):
        z = torch.tensor(rng.standard_normal((R, C)) * spread, dtype=DT[dtype])
        y = torch.tensor(rng.integers(0, C, R), dtype=torch.int64)
        # targets on the block edges where the row has them
        for i, c in enumerate((0, C - 1, BLOCK - 1, BLOCK, 2 * BLOCK)):
            if i < R and c < C:
                y[i] = c
        return z, y

    def compare(z, y, dtype, what, **opts):
        loss, g = call(z, y, **opts)
        assert loss.dtype == torch.float32 and loss.shape == (z.shape[0],)
        assert g.dtype == z.dtype
        np_opts = {k: (None if v is None else (v.numpy() if isinstance(v, torch.Tensor) else v))
                   for k, v in opts.items()}
        rl, rg = reference(as_np(z), y.numpy(), **np_opts)  # the reference sees the rounded inputs
        el, eg = rel_err(loss.numpy(), rl), rel_err(as_np(g), rg)
        tol = TOL[dtype]
        assert el <= tol and eg <= tol, f"{what} {dtype}: loss err {el:.3g}, grad err {eg:.3g} > {tol}"
        return max(el, eg)

    # C = 1, 7 (one partial block), block, block + 1, 3 * block - 5; R not a power of two
    SHAPES = [(5, 1), (7, 7), (3, BLOCK), (13, BLOCK + 1), (5, 3 * BLOCK - 5)]

    @check
    def check_available():
        import triton
        assert tt.available() is True
        return f"available() with TRITON_INTERPRET=1; interpreter block {BLOCK}; Triton {triton.__version__}"

    @check
    def check_shapes_float32():
        worst = 0.0
        for R, C in SHAPES:
            z, y = inputs(R, C)
            worst = max(worst, compare(z, y, "float32", f"R={R} C={C}"))
        return f"max err {worst:.2g} over (R, C) = {SHAPES}"

    def option_sets(C, R):
        keep = torch.ones(R, dtype=torch.bool)
        keep[1::3] = False
        cw = torch.tensor(rng.uniform(0.2, 2.0, C), dtype=torch.float32)
        cw[::4] = 0.0  # zero-weight classes (some targets among them)
        scale = torch.tensor(rng.uniform(-1.0, 2.0, R), dtype=torch.float32)
        scale[0] = 0.0
        return {
            "keep": dict(keep=keep), "cw": dict(cw=cw), "eps": dict(eps=0.1), "z_loss": dict(z_loss=0.05),
            "cap": dict(cap=4.0), "scale": dict(scale=scale),
            "all": dict(keep=keep, cw=cw, eps=0.1, z_loss=0.05, cap=4.0, scale=scale),
            "eps_cw_zloss": dict(cw=cw, eps=0.2, z_loss=1e-3),
        }

    def garbage(z, keep):
        """NaN / +inf / -inf in the rows that do not count."""
        z = z.clone()
        bad = (~keep).nonzero().squeeze(1).tolist()
        for j, r in enumerate(bad):
            z[r] = (float("nan"), float("inf"), float("-inf"))[j % 3]
            z[r, :: 2] = float("nan")
        return z

    def options_for(dtype):
        worst = {}
        for R, C in ((7, BLOCK + 1), (5, 3 * BLOCK - 5)):
            z, y = inputs(R, C, dtype)
            for name, opts in option_sets(C, R).items():
                zz = garbage(z, opts["keep"]) if "keep" in opts else z
                worst[name] = max(worst.get(name, 0.0), compare(zz, y, dtype, f"{name} C={C}", **opts))
        return ", ".join(f"{k} {v:.2g}" for k, v in worst.items())

    @check
    def check_options_float32():
        return options_for("float32")

    @check
    def check_options_bfloat16():
        return options_for("bfloat16")

    @check
    def check_options_float16():
        return options_for("float16")

    @check
    def check_dropped_rows_exact_zero():
        R, C = 6, BLOCK + 1
        z, y = inputs(R, C)
        keep = torch.tensor([True, False, True, False, False, True])
        zz = garbage(z, keep)
        for dtype in ("float32", "bfloat16"):
            for opts in (dict(), dict(eps=0.1, z_loss=0.1, cap=3.0, cw=torch.rand(C), scale=torch.rand(R))):
                zin = zz.to(DT[dtype])
                loss, g = call(zin, y, keep=keep, **opts)
                assert (loss[~keep] == 0).all() and (g[~keep] == 0).all(), "dropped rows not exactly 0"
                assert torch.isfinite(loss[keep]).all() and torch.isfinite(g[keep].float()).all()
                inplace = zin.clone()
                loss2, _ = call(inplace, y, keep=keep, out=inplace, **opts)
                assert (inplace[~keep] == 0).all(), "in place: the NaN rows were not overwritten with 0"
                assert torch.equal(loss2, loss) and torch.equal(inplace, g)
        return "loss and gradient rows exactly 0 over NaN/+inf/-inf rows, out of place and in place"

    @check
    def check_true_class_bfloat16_p_to_1():
        C = BLOCK + 36  # the target in the second block
        out = []
        for p in (0.9, 0.99, 0.999):
            L = math.log(p * (C - 1) / (1 - p))  # logit L at y, 0 elsewhere: p(y) = p
            z = torch.zeros(3, C)
            y = torch.tensor([5, BLOCK + 3, C - 1])
            z[torch.arange(3), y] = L
            zb = z.to(torch.bfloat16)
            _, g = call(zb, y)
            _, rg = reference(as_np(zb), y.numpy())
            got = as_np(g)[np.arange(3), y.numpy()]
            want = rg[np.arange(3), y.numpy()]
            rel = np.abs(got - want) / np.abs(want)
            assert (rel <= 0.01).all(), f"p={p}: true-class gradient relative error {rel} > 1%"
            # the bug this guards against: the probability cast to bfloat16 before subtracting 1
            naive = (torch.softmax(zb.float(), -1).to(torch.bfloat16)[torch.arange(3), y] - 1).float().numpy()
            naive_rel = float(np.max(np.abs(naive - want) / np.abs(want)))
            out.append(f"p={p}: err {rel.max():.2g} (bfloat16-first {naive_rel:.2g})")
            if p == 0.999:
                assert naive_rel > 0.5, "the p -> 1 case no longer exercises the bfloat16 cancellation"
        return "; ".join(out)

    @check
    def check_large_logits_exact():
        z = torch.tensor([[10000.0, 9999.0, -10000.0]])
        y = torch.tensor([0])
        loss, g = call(z, y)
        exact = math.log1p(math.exp(-1.0))  # 0.3132617
        assert abs(loss.item() - exact) <= 4 * 3e-8, f"loss {loss.item()!r}, exact {exact!r}"
        e = math.exp(-1.0)
        want = np.array([1 / (1 + e) - 1, e / (1 + e), 0.0])
        assert rel_err(g.numpy()[0], want) <= 1e-6
        assert g[0, 2].item() == 0.0
        worst = {"float32": 0.0, "bfloat16": 0.0}
        naive_worst = 0.0
        for center in (1e4, -1e4, 3e4, -3e4):
            for dtype in ("float32", "bfloat16"):
                R, C = 6, BLOCK + 5
                zc = torch.tensor(center + rng.standard_normal((R, C)) * 2, dtype=DT[dtype])
                order = torch.argsort(zc.float(), dim=1, descending=True)
                y = torch.stack([order[0, 0], order[1, 1], order[2, 0], order[3, 2], order[4, 0], order[5, 1]])
                # (no softcap here: cap * tanh(z / cap) near 1e4 is itself rounded at ulp(1e4) in
                # float32, in any implementation; the float64 reference would measure that rounding)
                for opts in (dict(), dict(eps=0.1), dict(z_loss=1e-4), dict(eps=0.2, z_loss=1e-4)):
                    worst[dtype] = max(worst[dtype], compare(zc, y, dtype, f"center {center:g} {opts}", **opts))
                if dtype == "float32":
                    # the bug avoided: lse and x_y each rounded at ulp(|z|) before subtracting
                    naive = torch.logsumexp(zc, 1) - zc[torch.arange(R), y]
                    naive_worst = max(naive_worst, rel_err(naive.numpy(), reference(as_np(zc), y.numpy())[0]))
        assert naive_worst > 10 * TOL["float32"], "the large-logit rows no longer exercise the shifted frame"
        return (f"[1e4, 9999, -1e4] -> {loss.item():.7f} (exact {exact:.7f}); around +-1e4, +-3e4: max err "
                f"float32 {worst['float32']:.2g}, bfloat16 {worst['bfloat16']:.2g} (float32 lse - x_y: {naive_worst:.2g})")

    @check
    def check_minus_inf_at_zero_mass_class():
        R, C = 4, BLOCK + 3
        z, y = inputs(R, C)
        y[:] = torch.tensor([2, 7, BLOCK + 1, 0])
        masked = [1, 5, BLOCK, C - 1]
        z[:, masked] = float("-inf")
        cw = torch.ones(C)
        cw[masked] = 0.0
        for dtype in ("float32", "bfloat16"):
            zz = z.to(DT[dtype])
            # weights 0 there: no mass even with smoothing and z-loss: finite, gradient exactly 0 there
            for opts in (dict(cw=cw, eps=0.1), dict(cw=cw, eps=0.1, z_loss=0.01, scale=torch.rand(R)), dict(),
                         dict(cap=5.0, cw=cw, eps=0.3)):
                loss, g = call(zz, y, **opts)
                assert torch.isfinite(loss).all() and torch.isfinite(g.float()).all(), opts
                assert (g[:, masked] == 0).all(), f"gradient not exactly 0 at the masked classes {opts}"
                compare(zz, y, dtype, f"-inf at zero mass {opts}", **opts)
        # with smoothing and no class weights every class has mass: +inf loss (the contract)
        loss, _ = call(z, y, eps=0.1)
        assert torch.isinf(loss).all() and (loss > 0).all(), loss
        # a target with no mass (weight 0) at a -inf logit: 0 log 0 = 0 as well
        zt = z.clone()
        zt[0, y[0]] = float("-inf")
        cw2 = torch.ones(C)
        cw2[y[0]] = 0.0
        cw2[masked] = 0.0
        loss, g = call(zt, y, cw=cw2)
        assert loss[0].item() == 0.0 and (g[0] == 0).all() and torch.isfinite(loss).all()
        return "finite loss, exactly 0 gradient at -inf zero-mass classes; +inf with smoothing and no weights"

    @check
    def check_loss_only_matches():
        z, y = inputs(7, 3 * BLOCK - 5)
        for opts in (dict(), dict(eps=0.1, z_loss=0.01, cap=3.0, cw=torch.rand(3 * BLOCK - 5))):
            l1, _ = call(z, y, **opts)
            l0, none = call(z, y, grad=False, **opts)
            assert none is None and torch.equal(l0, l1)
        return "out=None gives the same loss bit for bit"

    @check
    def check_in_place():
        out = []
        for dtype in ("float32", "bfloat16"):
            z, y = inputs(7, BLOCK + 1, dtype)
            opts = dict(eps=0.1, z_loss=0.01, scale=torch.rand(7), cap=4.0)
            l_ref, g_ref = call(z, y, **opts)
            zi = z.clone()
            v0 = zi._version
            l_in, g_in = call(zi, y, out=zi, **opts)
            assert g_in is zi and torch.equal(zi, g_ref) and torch.equal(l_in, l_ref)
            assert zi._version > v0, "in-place write did not bump the version counter"
            out.append(f"{dtype}: equal to out of place, _version {v0} -> {zi._version}")
        buf = torch.empty(7, BLOCK + 1)
        v0 = buf._version
        call(*inputs(7, BLOCK + 1), out=buf)
        assert buf._version > v0
        return "; ".join(out) + f"; separate out buffer: _version {v0} -> {buf._version}"

    @check
    def check_liger_272_version_counter():
        # Liger-Kernel issue 272: a kernel writing in place into a tensor autograd saved (here a
        # softmax output, which softmax's backward reads) silently corrupted the gradient, because
        # raw stores do not bump the version counter. With the bump, autograd raises instead.
        torch.manual_seed(0)
        C = 9
        h = torch.randn(4, C, requires_grad=True)
        p = torch.softmax(h, -1)
        y = torch.tensor([0, 3, 8, 1])
        tt.token_loss_triton(p.detach(), y, None, None, None, eps=0.0, z_loss=0.0, cap=None, out=p.detach())
        try:
            p.backward(torch.ones_like(p))
        except RuntimeError as exc:
            assert "modified by an inplace operation" in str(exc), str(exc)
        else:
            raise AssertionError("backward through the overwritten softmax output did not raise")
        # the test has teeth: without the bump the same pattern gives a wrong gradient and no error
        import torch.autograd.graph as graph
        real = graph.increment_version
        graph.increment_version = lambda t: None
        try:
            h2 = h.detach().clone().requires_grad_(True)
            p2 = torch.softmax(h2, -1)
            w = torch.randn(4, C)
            right = torch.autograd.grad((torch.softmax(h2, -1) * w).sum(), h2)[0]
            tt.token_loss_triton(p2.detach(), y, None, None, None, eps=0.0, z_loss=0.0, cap=None, out=p2.detach())
            (wrong,) = torch.autograd.grad((p2 * w).sum(), h2)
        finally:
            graph.increment_version = real
        assert not torch.allclose(wrong, right), "without the bump the gradient should have been silently wrong"
        return "backward raises 'modified by an inplace operation'; without the bump it silently differs"

    @check
    def check_empty_and_errors():
        z = torch.empty(0, 5)
        loss = tt.token_loss_triton(z, torch.empty(0, dtype=torch.int64), None, None, None, eps=0.0,
                                    z_loss=0.0, cap=None, out=torch.empty(0, 5))
        assert loss.shape == (0,) and loss.dtype == torch.float32
        try:
            tt.token_loss_triton(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64),
                                 None, None, None, eps=0.0, z_loss=0.0, cap=None, out=None)
        except TypeError:
            pass
        else:
            raise AssertionError("float64 logits did not raise TypeError")
        try:
            tt.token_loss_triton(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), None, None, None,
                                 eps=0.0, z_loss=0.0, cap=None, out=torch.zeros(2, 3, dtype=torch.bfloat16))
        except TypeError:
            pass
        else:
            raise AssertionError("an out of another dtype did not raise")
        return "R = 0 gives an empty float32 loss; float64 and a mismatched out raise TypeError"

    @check
    def check_launch_config():
        for C in (1, 7, 64, 65, 32000, 128256):
            b, w = tt.launch_config(C, "cuda")
            assert b & (b - 1) == 0 and b <= tt.GPU_MAX_BLOCK and w >= 1
            assert b >= min(C, tt.GPU_MAX_BLOCK)
            bi, _ = tt.launch_config(C, "cpu")
            assert bi & (bi - 1) == 0 and bi <= BLOCK
        return f"128256 classes on CUDA: {tt.launch_config(128256, 'cuda')}"

    run_all()


# ------------------------------------------------------------------------ ahead-of-time compile (sm_90)

def compile_checks() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET for this mode"

    @check
    def check_lazy_import():
        import xseqloss  # noqa: F401
        from xseqloss.internals import part; torch_triton = part("torch", "triton")
        assert "triton" not in sys.modules, "importing the launcher imported triton"
        return "importing xseqloss.backends.torch.triton leaves triton unimported"

    @check
    def check_compiles_for_sm90():
        import triton
        from triton.backends.compiler import GPUTarget

        from xseqloss.internals import part
        K = part("torch", "_triton_kernels")
        tt = part("torch", "triton")

        assert not K.INTERPRETED
        names = ("HAS_KEEP", "HAS_CW", "HAS_SCALE", "HAS_EPS", "HAS_Z", "HAS_CAP", "WRITE_GRAD")
        on = dict.fromkeys(names, True)
        off = dict.fromkeys(names, False)
        variants = [("fp32", on), ("bf16", on), ("fp16", on), ("bf16", off), ("bf16", dict(off, WRITE_GRAD=True)),
                    ("fp32", dict(off, HAS_EPS=True, HAS_CW=True, WRITE_GRAD=True))]
        done = []
        for dt, flags in variants:
            block, warps = tt.launch_config(128256, "cuda")
            sig = {"z_ptr": f"*{dt}", "y_ptr": "*i64", "keep_ptr": "*u8", "cw_ptr": "*fp32", "scale_ptr": "*fp32",
                   "loss_ptr": "*fp32", "out_ptr": f"*{dt}", "C": "i32", "stride_z": "i32", "stride_out": "i32",
                   "one_minus_eps": "fp32", "b": "fp32", "z_loss": "fp32", "cap": "fp32"}
            consts = dict(flags, BLOCK=block, WHILE_LOOPS=False)
            sig.update(dict.fromkeys(consts, "constexpr"))
            src = triton.compiler.ASTSource(fn=K.token_loss_kernel, signature=sig, constexprs=consts)
            ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert ck.asm.get("cubin"), "no cubin"
            ttir = ck.asm["ttir"]
            # 64-bit row offsets: the program id widened, then multiplied by the stride in i64
            assert "tt.get_program_id x : i32" in ttir and "arith.extsi %row" in ttir, "row not widened"
            muls = [ln for ln in ttir.splitlines() if "arith.muli" in ln and ": i64" in ln]
            assert len(muls) >= (2 if flags["WRITE_GRAD"] else 1), "row * stride is not an i64 multiply"
            assert "scf.for" in ttir and "scf.while" not in ttir
            done.append(dt + "/" + ("all" if flags == on else "+".join(k for k, v in flags.items() if v) or "none"))
        return "cubin for sm_90, i64 row offsets: " + ", ".join(done)

    run_all()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "interpret"
    {"interpret": interpret_checks, "compile": compile_checks}[mode]()
    print(json.dumps(RESULTS))
