"""The fused output layer, ``linear_cross_entropy`` (API.md section 8, issue 13). Values and
gradients against the float64 reference for every option, layout and dtype are in the conformance
suite (conformance/linear.py); here: that it equals sequence_cross_entropy of the materialised
logits across the option matrix and chunk sizes, the memory bound, the numerics (bfloat16 at
p(y) -> 1, float32 weight-gradient accumulation), every kind of upstream gradient, the framework
habits (Module, torch.compile, jit / grad / vmap, tf.function(jit_compile=True)) and the errors."""

import os
import numpy as np
import pytest

from helpers.support import assert_close, require_or_skip

import xseqloss as xsl

rng0 = np.random.default_rng(11)

OPTION_SETS = {
    "plain": {},
    "mix": dict(label_smoothing=0.1, class_weights=True, weights=True, mask=True, z_loss=1e-3, logit_softcap=8.0),
    "others_lengths": dict(label_smoothing=0.2, smoothing="others", lengths=True, reduction="per_sequence"),
    "soft": dict(soft=True, label_smoothing=0.05, class_weights=True),
    "shift_segments": dict(shift=1, segments=True, reduction="per_segment", ignore=True),
    "tokens_positions": dict(denominator="positions", reduction="per_position", mask=True),
    "none": dict(reduction="none", weights=True),
    "normalizer": dict(normalizer=3.5, ignore=True),
}


def _case(name, N=3, T=4, H=5, C=6, seed=0):
    r = np.random.default_rng(seed)
    spec = OPTION_SETS[name]
    h = r.normal(size=(N, T, H))
    w = r.normal(size=(C, H))
    y = r.integers(0, C, size=(N, T))
    kw = {k: v for k, v in spec.items() if k not in ("class_weights", "weights", "mask", "lengths", "soft",
                                                        "segments", "ignore")}
    if spec.get("ignore"):
        y[0, 1] = -100
    t = r.dirichlet(np.ones(C), size=(N, T)) if spec.get("soft") else y
    if spec.get("class_weights"):
        kw["class_weights"] = r.uniform(0.5, 2.0, C)
    if spec.get("weights"):
        kw["weights"] = r.uniform(0.0, 2.0, (N, T))
    if spec.get("mask"):
        kw["mask"] = r.uniform(size=(N, T)) > 0.3
    if spec.get("lengths"):
        kw["lengths"] = np.array([4, 2, 3])
    if spec.get("segments"):
        kw["segment_ids"] = np.array([[0, 0, 1, 1], [3, 3, 3, -1], [1, 2, 2, 2]])
    return h, w, t, kw


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_equals_the_materialised_logits(backend, name):
    """Value and d hidden equal sequence_cross_entropy of h @ W^T + b for chunks of 1, 5 and all
    tokens (chunk boundaries inside sequences), both weight layouts, with a bias."""
    h, w, t, kw = _case(name)
    b = rng0.normal(size=w.shape[0])
    z = h @ w.T + b
    ref, gz = backend.loss_and_grad(z, t, **kw)
    ref, gz = backend.float_out(ref), backend.float_out(gz)
    for chunk, wl in ((1, "CH"), (5, "HC"), (None, "CH")):
        W = w if wl == "CH" else w.T
        v, grads = xsl.linear_value_and_grad(backend.array(h), backend.array(W), backend.array(t), bias=backend.array(b),
                                             weight_layout=wl, chunk_size=chunk,
                                             **{k: (backend.array(v) if isinstance(v, np.ndarray) else v)
                                                for k, v in kw.items()})
        dh, dw, db = (backend.float_out(g) for g in grads)
        assert_close(backend.float_out(v), ref, what=f"value chunk={chunk}")
        assert_close(dh, gz @ w, what=f"d hidden chunk={chunk}")
        want_dw = np.einsum("ntc,nth->ch", gz, h)
        assert_close(dw, want_dw if wl == "CH" else want_dw.T, what=f"d weight chunk={chunk}")
        assert_close(db, gz.sum((0, 1)), what=f"d bias chunk={chunk}")


@pytest.mark.parametrize("name", ["mix", "shift_segments"])
def test_garbage_hidden_states_where_tokens_do_not_count(backend, name):
    """NaN and inf hidden states at tokens that do not count (masked, ignored, padding segments,
    the shifted-out last position; lengths are in the conformance case lin_garbage_uncounted)
    reach nothing: value and every gradient equal the call with those rows zeroed, all finite
    (decision 55; the materialised logits' autograd would give d weight = 0 * NaN = NaN)."""
    h, w, t, kw = _case(name)
    b = rng0.normal(size=w.shape[0])
    opts = {k: (backend.array(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    ref = xsl.linear_value_and_grad(h, w, t, bias=b, backend="numpy", **{**kw, "reduction": "none"})
    counted = ref[0] != 0  # reduction="none": the tokens that count have a loss (> 0 here)
    dirty = h.copy()
    dirty[~counted] = np.where(np.arange(h.shape[-1]) % 2, np.nan, np.inf)
    clean = np.where(counted[..., None], h, 0.0)
    for chunk in (1, None):
        got = [xsl.linear_value_and_grad(backend.array(x), backend.array(w), backend.array(t), bias=backend.array(b),
                                         chunk_size=chunk, **opts) for x in (dirty, clean)]
        (vd, gd), (vc, gc) = got
        assert np.isfinite(backend.float_out(vd)).all()
        assert_close(backend.float_out(vd), backend.float_out(vc), what=f"value chunk={chunk}")
        for what, a, c in zip(("dh", "dw", "db"), gd, gc):
            a, c = backend.float_out(a), backend.float_out(c)
            assert np.isfinite(a).all(), (what, chunk)
            assert_close(a, c, what=f"{what} chunk={chunk}")


@pytest.mark.parametrize("layout", ["TNH", "NH", "H"])
def test_other_layouts(backend, layout):
    r = np.random.default_rng(5)
    shape = {"TNH": (4, 3, 5), "NH": (6, 5), "H": (5,)}[layout]
    h = r.normal(size=shape)
    w = r.normal(size=(7, 5))
    y = r.integers(0, 7, size=shape[:-1])
    z = h @ w.T
    ref = backend.float_out(backend.loss(z, y, layout=layout.replace("H", "C")))
    got = backend.float_out(xsl.linear_cross_entropy(backend.array(h), backend.array(w), backend.array(y), layout=layout,
                                                     chunk_size=2))
    assert_close(got, ref)


# ------------------------------------------------------------------ memory

_MEMORY_C, _MEMORY_CHUNK = 4096, 128


def _memory_cases():
    """The NumPy memory tests' layer at 2,048 and then 4,096 tokens: (tokens, hidden, weight, labels),
    H = 64, C = _MEMORY_C, float32 (the weight drawn once, before the first hidden states)."""
    H = 64
    w = rng0.normal(size=(_MEMORY_C, H)).astype(np.float32)
    for tokens in (2048, 4096):
        h = rng0.normal(size=(tokens, H)).astype(np.float32)
        yield tokens, h, w, rng0.integers(0, _MEMORY_C, size=tokens)


def test_numpy_peak_memory_stays_within_two_chunks():
    """tracemalloc (NumPy's allocations): forward and backward beyond the inputs and the returned
    gradients stay within two chunks' float32 logits plus O(tokens), whatever the tokens."""
    import tracemalloc
    C, chunk = _MEMORY_C, _MEMORY_CHUNK
    peaks = []
    for tokens, h, w, y in _memory_cases():
        xsl.linear_value_and_grad(h[:chunk], w, y[:chunk], layout="NH", chunk_size=chunk)  # warm caches
        tracemalloc.start()
        _, (dh, dw, _) = xsl.linear_value_and_grad(h, w, y, layout="NH", chunk_size=chunk)
        peak = tracemalloc.get_traced_memory()[1] - dh.nbytes - dw.nbytes
        tracemalloc.stop()
        peaks.append(peak)
        logits = tokens * C * 4
        assert peak <= 2 * chunk * C * 4 + 64 * tokens + (1 << 20), (peak, logits)
        assert peak < 0.15 * logits
    assert abs(peaks[1] - peaks[0]) <= 0.1 * peaks[0] + 64 * 2048, peaks  # the same absolute peak


def test_torch_never_allocates_the_logits():
    """The profiler's memory events: no tensor as large as a third of the logits is ever allocated
    (two chunks are 2 / 16 of them here), forward and backward."""
    require_or_skip("torch")
    import torch
    from torch.profiler import ProfilerActivity, profile
    tokens, H, C, chunk = 4096, 64, 4096, 256
    h = torch.randn(tokens, H, requires_grad=True)
    w = torch.randn(C, H, requires_grad=True)
    y = torch.randint(0, C, (tokens,))
    xsl.linear_cross_entropy(h[:chunk], w, y[:chunk], layout="NH", chunk_size=chunk).backward()
    h.grad = w.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        xsl.linear_cross_entropy(h, w, y, layout="NH", chunk_size=chunk).backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    logits = tokens * C * 4
    assert biggest <= chunk * C * 4 + 1024, (biggest, logits)
    assert biggest < logits / 3


TF_PEAK_SNIPPET = """
import json, sys
import numpy as np, tensorflow as tf
import xseqloss as xsl
try:
    tf.config.experimental.get_memory_info("CPU:0")
except ValueError:
    print(json.dumps(None)); sys.exit(0)
rng = np.random.default_rng(11)
H, C, chunk = 256, 8192, 64
w = tf.constant(rng.normal(size=(C, H)).astype(np.float32))
peaks = []
for tokens in (2048, 4096):
    h = tf.constant(rng.normal(size=(tokens, H)).astype(np.float32))
    y = tf.constant(rng.integers(0, C, size=tokens))

    @tf.function
    def step(h, w, y):
        with tf.GradientTape() as tape:
            tape.watch([h, w])
            loss = xsl.linear_cross_entropy(h, w, y, layout="NH", chunk_size=chunk)
        return tape.gradient(loss, [h, w])
    for _ in range(2):  # traced, and the allocator's pool grown, before the measured step
        g = step(h, w, y)
        del g
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    print("MEASURED STEP BEGINS", file=sys.stderr, flush=True)
    g = step(h, w, y)
    _ = g[0][0, 0].numpy()
    print("MEASURED STEP ENDS", file=sys.stderr, flush=True)
    peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before - (tokens * H * 4 + C * H * 4))
    del g
print(json.dumps(peaks))
"""


def _requested_peaks(log: str) -> list[int]:
    """Per measured step, the peak of bytes requested and not yet freed, from the allocator's own
    log of each allocation and deallocation with its size (``[mem-debug]`` lines)."""
    out, live, peak, inside = [], 0, 0, False
    for line in log.splitlines():
        if "MEASURED STEP BEGINS" in line:
            live, peak, inside = 0, 0, True
        elif "MEASURED STEP ENDS" in line:
            out.append(peak)
            inside = False
        elif inside and "[mem-debug] " in line:
            kind, _, size = line.split("[mem-debug] ")[1].split(",")[:3]
            live += int(size) if kind == "AllocateRaw" else -int(size)
            peak = max(peak, live)
    return out


def test_tensorflow_peak_memory_stays_within_a_chunk():
    """TensorFlow's allocator's peak: forward and backward beyond the inputs and the returned
    gradients hold one chunk's float32 logits, whatever the tokens: the gradient is formed in the
    logits' buffer (decision 58), the d weight term is added a block at a time (a whole one is
    8 MiB here, four chunks) and d hidden is written into the returned buffer (decision 57). A
    gradient in a buffer of its own would be two chunks. The bound is on the bytes the step
    requested (the allocator's log of each request), in a fresh process; its count of bytes in
    use can be higher by where it places a request (it takes a free block of less than twice
    the request whole), which depends on the process's earlier allocations and thread timing:
    in some processes 4 MiB more at 4,096 tokens here, none at the benchmark's size."""
    import json
    import subprocess
    import sys
    require_or_skip("tensorflow")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="bfc_allocator=4")
    proc = subprocess.run([sys.executable, "-c", TF_PEAK_SNIPPET], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    in_use = json.loads(proc.stdout.strip().splitlines()[-1])
    if in_use is None:
        pytest.skip("this TensorFlow build's CPU allocator keeps no statistics")
    requested = _requested_peaks(proc.stderr)
    assert len(requested) == 2, "the allocator logged no requests (its log format changed?)"
    chunk_bytes = 64 * 8192 * 4
    extras = [peak - (tokens * 256 * 4 + 8192 * 256 * 4) for tokens, peak in zip((2048, 4096), requested)]
    for tokens, extra in zip((2048, 4096), extras):  # beyond the returned gradients
        assert extra <= chunk_bytes + (256 << 10), (tokens, extra, chunk_bytes, in_use)
    assert abs(extras[1] - extras[0]) <= 0.1 * extras[0] + (256 << 10), extras  # the same absolute peak
    for tokens, peak in zip((2048, 4096), in_use):  # the allocator's own count, placement included
        assert peak <= 3 * chunk_bytes + (1 << 20), (tokens, peak, chunk_bytes)
        assert peak < 0.15 * tokens * 8192 * 4, (tokens, peak)


@pytest.mark.parametrize("blocks", ["fixed", "overlapped"])
@pytest.mark.parametrize("name", ["plain", "mix"])
def test_tensorflow_d_weight_in_blocks(name, blocks, monkeypatch):
    """d weight added a few rows at a time equals the materialised logits' gradient, with a bias:
    classes for "CH", and for "HC" classes of a transposed accumulator where H <= the chunk
    (chunk 6) or hidden units where it is not (chunk 3); the last block shorter; blocks of a fixed
    size, or from the budget with each product overlapping the previous block's add."""
    require_or_skip("tensorflow")
    from xseqloss import internals
    from helpers.support import get_backend
    backend = get_backend("tensorflow")
    lin = internals.part("tensorflow", "linear")
    if blocks == "fixed":
        monkeypatch.setattr(lin, "DW_BLOCK_BYTES", 4 * 8 * 5)  # float64, H = 5: 4 classes or 3 hidden units
    else:  # the whole chunk's logits as the budget: 2-3 classes a block for "CH", overlapped
        monkeypatch.setattr(lin, "DW_WHOLE_BYTES", 0)
        monkeypatch.setattr(lin, "DW_IN_PLACE_SHARE", 1)
        monkeypatch.setattr(lin, "DW_OVERLAP_MIN_ROWS", 1)
        assert lin.d_weight_blocks(6, 5, 5, 30, 8) == (2, True)
        assert lin.d_weight_blocks(6, 5, 5, 15, 8) == (1, True)
        assert lin.d_weight_blocks(5, 6, 3, 10, 8) == (1, False)  # two terms of 6 and a slice of 3 exceed 10
        # blocks the block-count bound makes larger than the budget: one term at a time, not two
        assert lin.d_weight_blocks(1000, 5, 5, 100, 8) == (10, False)  # 8 overlapped would be 120 > 100
        assert lin.d_weight_blocks(1000, 5, 5, 120, 8) == (8, True)  # 8 rows overlapped are within it
    monkeypatch.setattr(internals.backend("tensorflow"), "_functions", {})  # no trace made with whole terms is reused
    monkeypatch.setattr(internals.backend("tensorflow"), "_concrete", {})
    h, w, t, kw = _case(name)
    b = rng0.normal(size=w.shape[0])
    ref, gz = get_backend("numpy").loss_and_grad(h @ w.T + b, t, **kw)
    opts = {k: (backend.array(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    for wl, chunk in (("CH", 5), ("HC", 6), ("HC", 3)):  # 12 tokens: chunks of 4 (5), 6 and 3
        W = w if wl == "CH" else w.T
        v, (dh, dw, db) = xsl.linear_value_and_grad(backend.array(h), backend.array(W), backend.array(t),
                                                    bias=backend.array(b), weight_layout=wl, chunk_size=chunk, **opts)
        want_dw = np.einsum("ntc,nth->ch", gz, h)
        what = f"{wl}, chunk {chunk}"
        assert_close(backend.float_out(v), ref, what=f"value {what}")
        assert_close(backend.float_out(dh), gz @ w, what=f"d hidden {what}")
        assert_close(backend.float_out(dw), want_dw if wl == "CH" else want_dw.T, what=f"d weight {what}")
        assert_close(backend.float_out(db), gz.sum((0, 1)), what=f"d bias {what}")


def test_tensorflow_d_weight_transposed_only_within_the_chunk():
    """An (H, C) weight's d weight accumulates as (C, H) outside XLA only where the final
    transpose fits in the chunk's freed buffer: H <= chunk rows (decision 115)."""
    require_or_skip("tensorflow")
    import tensorflow as tf
    from xseqloss import internals
    lin = internals.part("tensorflow", "linear")
    rp = type("RowPlan", (), {"plain": True})()
    for H, chunk, want in ((5, 5, True), (5, 3, False), (8, 8, True)):
        lay = type("Lay", (), {"weight_layout": "HC", "chunk": chunk})()
        h2, w = tf.zeros([3 * chunk, H], tf.float32), tf.zeros([H, 7], tf.float32)  # whole chunks
        assert lin.TfChunks(rp, lay, tf.float32, h2, w, None, True).dw_t is want, (H, chunk)
        assert lin.TfChunks(rp, lay, tf.float32, h2, w, None, False).dw_t is False


# ------------------------------------------------------------------ numerics

def test_bfloat16_true_class_gradient_at_p_near_one():
    """p(y) = 0.9, 0.99, 0.999 in bfloat16: the true-class gradient entry (p - 1 of a tiny number)
    within 1% of the float64 value. PyTorch's own bfloat16 CPU cross-entropy rounds p to bfloat16
    first and is off by up to 100% at 0.999 (Liger-Kernel PR 1329 is the same bug in place)."""
    require_or_skip("torch")
    import torch
    C = 32000
    errors_ours, errors_torch = [], []
    for p in (0.9, 0.99, 0.999):
        margin = float(np.log(p * (C - 1) / (1 - p)))
        h = torch.tensor([[1.0]], dtype=torch.bfloat16, requires_grad=True)
        w = torch.zeros(C, 1, dtype=torch.bfloat16)
        w[3, 0] = margin
        w.requires_grad_(True)
        y = torch.tensor([3])
        m64 = float(w[3, 0].double())
        p64 = np.exp(m64) / (np.exp(m64) + C - 1)
        exact = p64 - 1.0  # d loss / d z_y, and d loss / d w[3, 0] = (p - 1) * h with h = 1
        xsl.linear_cross_entropy(h, w, y, layout="NH").backward()
        errors_ours.append(abs(float(w.grad[3, 0].double()) - exact) / abs(exact))
        z = (h.detach() @ w.detach().t()).requires_grad_(True)
        torch.nn.functional.cross_entropy(z, y).backward()
        errors_torch.append(abs(float(z.grad[0, 3].double()) - exact) / abs(exact))
    assert max(errors_ours) < 0.01, errors_ours
    assert max(errors_torch) > 0.1, errors_torch  # the bug this guards against is real


def test_weight_gradient_accumulates_in_float32():
    """256 chunks of one token in bfloat16: a bfloat16 running sum of d weight would drift (Liger
    512, xtuner 1747); float32 accumulation matches the float64 sum to bfloat16 precision."""
    require_or_skip("torch")
    import torch
    r = np.random.default_rng(3)
    tokens, H, C = 256, 8, 16
    h = r.normal(size=(tokens, H))
    w = r.normal(size=(C, H)) * 0.3
    y = r.integers(0, C, tokens)
    hb = torch.tensor(h).bfloat16()
    wb = torch.tensor(w).bfloat16().requires_grad_(True)
    xsl.linear_cross_entropy(hb, wb, torch.tensor(y), layout="NH", chunk_size=1, reduction="sum").backward()
    h64, w64 = hb.double().numpy(), wb.detach().double().numpy()
    _, g = xsl.value_and_grad(h64 @ w64.T, y, layout="NC", reduction="sum")
    want = g.T @ h64
    err = np.abs(wb.grad.double().numpy() - want).max() / np.abs(want).max()
    assert err < 1e-2, err


# ------------------------------------------------------------------ upstream gradients

def test_every_upstream_gradient_is_right_torch():
    require_or_skip("torch")
    import torch
    h, w, y, kw = _case("mix", seed=2)
    kw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    ht, wt = torch.tensor(h, requires_grad=True), torch.tensor(w, requires_grad=True)
    z = (ht @ wt.t()).detach().requires_grad_(True)
    for reduction, up in (("mean", 1024.0), ("mean", 1.0 + 1e-4), ("none", None), ("per_sequence", None)):
        ht.grad = wt.grad = z.grad = None
        out = xsl.linear_cross_entropy(ht, wt, torch.tensor(y), reduction=reduction, chunk_size=5, **kw)
        ref = xsl.sequence_cross_entropy(z, torch.tensor(y), reduction=reduction, **kw)
        ct = torch.tensor(rng0.normal(size=out.shape)) if up is None else torch.tensor(up)
        (out * ct).sum().backward()
        (ref * ct).sum().backward()
        assert_close(ht.grad.numpy(), (z.grad @ wt.detach()).numpy(), what=f"{reduction} d hidden")
        assert_close(wt.grad.numpy(), (z.grad.reshape(-1, w.shape[0]).t() @ ht.detach().reshape(-1, h.shape[-1])).numpy(),
                     what=f"{reduction} d weight")
    # a second backward through the same graph (retain_graph): the same gradients again
    ht.grad = wt.grad = None
    out = xsl.linear_cross_entropy(ht, wt, torch.tensor(y), chunk_size=5, **kw)
    out.backward(retain_graph=True)
    g1 = ht.grad.clone()
    ht.grad = None
    (2.0 * out).backward()
    assert_close(ht.grad.numpy(), 2.0 * g1.numpy())


def test_grad_scaler_style_loss_scale_torch():
    require_or_skip("torch")
    import torch
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    (xsl.linear_cross_entropy(h, w, y, layout="NH") * 65536.0).backward()
    g = h.grad.clone()
    h.grad = None
    xsl.linear_cross_entropy(h, w, y, layout="NH").backward()
    assert torch.allclose(g / 65536.0, h.grad, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ framework habits

def test_torch_module_and_compile_without_graph_breaks():
    require_or_skip("torch")
    import torch
    from xseqloss.torch import LinearCrossEntropyLoss
    fn = LinearCrossEntropyLoss(label_smoothing=0.1, reduction="sum", chunk_size=3)
    assert "chunk_size=3" in repr(fn)
    h = torch.randn(2, 4, 5, requires_grad=True)
    w = torch.randn(7, 5, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    y = torch.randint(0, 7, (2, 4))
    eager = fn(h, w, y, bias=b)
    eager.backward()
    g_eager = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, y, b: fn(h, w, y, bias=b), fullgraph=True)
    out = compiled(h, w, y, b)
    out.backward()
    assert torch.allclose(out, eager, rtol=1e-5)
    for t, g in zip((h, w, b), g_eager):
        assert torch.allclose(t.grad, g, rtol=1e-5, atol=1e-6)


def test_jax_jit_grad_and_vmap():
    require_or_skip("jax")
    import jax
    import jax.numpy as jnp
    r = np.random.default_rng(4)
    h = jnp.asarray(r.normal(size=(3, 2, 4, 5)))  # a leading batch of 3 for vmap
    w = jnp.asarray(r.normal(size=(6, 5)))
    y = jnp.asarray(r.integers(0, 6, size=(3, 2, 4)))
    f = lambda h, w, y: xsl.linear_cross_entropy(h, w, y, chunk_size=3, label_smoothing=0.1)  # noqa: E731
    g = jax.jit(jax.grad(f, argnums=(0, 1)))(h[0], w, y[0])
    z = lambda h, w, y: xsl.sequence_cross_entropy(h @ w.T, y, label_smoothing=0.1)  # noqa: E731
    gz = jax.grad(z, argnums=(0, 1))(h[0], w, y[0])
    for a, b in zip(g, gz):
        assert_close(np.asarray(a), np.asarray(b))
    batched = jax.vmap(f, in_axes=(0, None, 0))(h, w, y)
    assert_close(np.asarray(batched), np.asarray([z(h[i], w, y[i]) for i in range(3)]))
    gb = jax.vmap(jax.grad(f), in_axes=(0, None, 0))(h, w, y)
    assert_close(np.asarray(gb), np.asarray([jax.grad(z)(h[i], w, y[i]) for i in range(3)]))


def test_tf_function_jit_compile():
    require_or_skip("tensorflow")
    import tensorflow as tf
    r = np.random.default_rng(6)
    h = tf.constant(r.normal(size=(2, 5, 4)).astype(np.float32))
    w = tf.constant(r.normal(size=(4, 7)).astype(np.float32))  # a Dense kernel: (H, C)
    y = tf.constant(r.integers(0, 7, size=(2, 5)))

    @tf.function(jit_compile=True)
    def step(h, w):
        with tf.GradientTape() as tape:
            tape.watch([h, w])
            loss = xsl.linear_cross_entropy(h, w, y, weight_layout="HC", chunk_size=3)
        return loss, tape.gradient(loss, [h, w])
    loss, (dh, dw) = step(h, w)
    ref, gz = xsl.value_and_grad(h.numpy() @ w.numpy(), y.numpy())
    assert_close(float(loss), float(ref), "float32")
    assert_close(dh.numpy(), gz @ w.numpy().T, "float32")
    assert_close(dw.numpy(), np.einsum("nth,ntc->hc", h.numpy(), gz), "float32")


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("what, kind, match", [
    ("dtype", xsl.XSeqLossTypeError, "weight has dtype float32 but hidden has float64"),
    ("H", xsl.XSeqLossError, "weight has shape .* but hidden has H = 5"),
    ("other_layout", xsl.XSeqLossError, "did you mean weight_layout='HC'"),
    ("chunk", xsl.XSeqLossError, r"chunk_size=0 is out of range"),
    ("inputs", xsl.XSeqLossError, "inputs is not an option of linear_cross_entropy"),
    ("inplace", xsl.XSeqLossError, "inplace_backward is not an option of linear_cross_entropy"),
    ("bias", xsl.XSeqLossError, r"bias has shape \(6,\) but must be \(C=7,\)"),
    ("label", xsl.XSeqLossError, r"targets\[0, 1\] = 7 is out of range"),
])
def test_errors(backend, what, kind, match):
    h = rng0.normal(size=(2, 3, 5))
    w = rng0.normal(size=(7, 5))
    y = np.zeros((2, 3), np.int64)
    kw = {}
    if what == "dtype":
        w = w.astype(np.float32)
    elif what == "H":
        w = rng0.normal(size=(7, 4))
    elif what == "other_layout":
        w = w.T.copy()
    elif what == "chunk":
        kw["chunk_size"] = 0
    elif what == "inputs":
        kw["inputs"] = "probs"
    elif what == "inplace":
        kw["inplace_backward"] = True
    elif what == "bias":
        kw["bias"] = backend.array(np.zeros(6))
    elif what == "label":
        y[0, 1] = 7
    with pytest.raises(kind, match=match):
        xsl.linear_cross_entropy(backend.array(h), backend.array(w), backend.array(y), **kw)


def test_bad_label_is_nan_when_traced():
    require_or_skip("jax")
    import jax
    import jax.numpy as jnp
    h = jnp.ones((1, 3, 2))
    w = jnp.ones((4, 2))
    y = jnp.array([[0, 9, 1]])
    out = jax.jit(lambda h, y: xsl.linear_cross_entropy(h, w, y, reduction="none"))(h, y)
    assert bool(jnp.isnan(out[0, 1])) and bool(jnp.isfinite(out[0, [0, 2]]).all())
    # labels closed over are concrete: they are checked even inside the trace (decisions.md 24)
    with pytest.raises(xsl.XSeqLossError, match=r"targets\[0, 1\] = 9"):
        jax.jit(lambda h: xsl.linear_cross_entropy(h, w, y, reduction="none"))(h)


# ------------------------------------------------------------------- Keras 3: a Dense kernel feeds the loss

KERAS_SNIPPET = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import numpy as np, keras, xseqloss as xsl
rng = np.random.default_rng(0)
x = rng.normal(size=(2, 5, 6)).astype("float32")
y = np.array([[1, 2, 3, -100, 0], [6, 5, 4, 3, 2]])
inp = keras.Input((5, 6))
feat = keras.layers.Dense(4, name="features")(inp)
head = keras.layers.Dense(7, name="head")           # the output layer: its kernel is (H, C) = (4, 7)
model = keras.Model(inp, head(feat))
features = keras.Model(inp, feat)(x)
backend = keras.backend.backend()
def fused(k, b):
    return xsl.linear_cross_entropy(features, k, y, bias=b, weight_layout="HC", label_smoothing=0.1, chunk_size=3)
def naive(k, b):
    return xsl.sequence_cross_entropy(features @ k + b, y, label_smoothing=0.1)
k, b = head.kernel.value, head.bias.value
if backend == "tensorflow":
    import tensorflow as tf
    out = {}
    for name, f in (("fused", fused), ("naive", naive)):
        with tf.GradientTape() as tape:
            tape.watch([k, b]); v = f(k, b)
        gk, gb = tape.gradient(v, [k, b]); out[name] = (float(v), np.asarray(gk).tolist(), np.asarray(gb).tolist())
else:
    import jax
    out = {name: (float(f(k, b)), *[np.asarray(g).tolist() for g in jax.grad(f, argnums=(0, 1))(k, b)])
           for name, f in (("fused", fused), ("naive", naive))}
out["model"] = float(xsl.sequence_cross_entropy(model(x), y, label_smoothing=0.1))
out["backend"] = backend
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend,framework", [("tensorflow", "tensorflow"), ("jax", "jax")])
def test_keras_dense_kernel_feeds_the_fused_loss(backend, framework):
    """docs/porting.md: a Keras 3 model whose last Dense layer's kernel (H, C) feeds the loss, with
    weight_layout="HC", on the TensorFlow and JAX Keras backends: value and kernel/bias gradients
    equal the loss of the materialised logits."""
    import json
    import subprocess
    import sys
    require_or_skip(framework)  # keras itself is in requirements-dev.txt
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", KERAS_SNIPPET], capture_output=True, text=True, env=env,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["backend"] == backend
    for a, b in zip(r["fused"], r["naive"]):
        assert_close(np.asarray(a), np.asarray(b), tol=1e-5)
    assert r["fused"][0] == pytest.approx(r["model"], rel=1e-5)


@pytest.mark.parametrize("weight_layout", ["CH", "HC"])
def test_jax_d_weight_in_class_blocks(monkeypatch, weight_layout):
    """JAX accumulates d weight a block of classes at a time (backends/jax/linear.py CLASS_BLOCK, a
    memory fix); blocks of 3 over 7 classes: the last block overlaps the one before it and masks
    the overlap. Chunks of at most 4 over 10 tokens: linear.even_chunk picks 5 chunks of 2."""
    require_or_skip("jax")
    import jax
    import jax.numpy as jnp
    from xseqloss import internals
    monkeypatch.setattr(internals.part("jax", "linear"), "CLASS_BLOCK", 3)
    even_chunk = internals.core.chunks.even_chunk
    assert even_chunk(10, 4) == 2 and even_chunk(7, 3) == 3  # 7 is prime: padded chunks
    r = np.random.default_rng(7)
    h = jnp.asarray(r.normal(size=(2, 5, 4)))
    w = jnp.asarray(r.normal(size=(7, 4) if weight_layout == "CH" else (4, 7)))
    y = jnp.asarray(r.integers(0, 7, size=(2, 5)))
    f = lambda h, w: xsl.linear_cross_entropy(h, w, y, chunk_size=4, weight_layout=weight_layout,  # noqa: E731
                                              label_smoothing=0.1)
    z = lambda h, w: xsl.sequence_cross_entropy(h @ (w.T if weight_layout == "CH" else w), y,  # noqa: E731
                                                label_smoothing=0.1)
    for cot in (None, jnp.asarray(r.normal(size=(2, 5)))):  # the expected upstream, and a cotangent
        if cot is None:
            got, want = jax.grad(f, argnums=(0, 1))(h, w), jax.grad(z, argnums=(0, 1))(h, w)
        else:
            fn = lambda g: (lambda h, w: jnp.sum(g(h, w) * cot))  # noqa: E731
            kw = dict(reduction="none")
            got = jax.grad(fn(lambda h, w: xsl.linear_cross_entropy(h, w, y, chunk_size=4, weight_layout=weight_layout,
                                                                     **kw)), argnums=(0, 1))(h, w)
            want = jax.grad(fn(lambda h, w: xsl.sequence_cross_entropy(
                h @ (w.T if weight_layout == "CH" else w), y, **kw)), argnums=(0, 1))(h, w)
        for a, b in zip(got, want):
            assert_close(np.asarray(a), np.asarray(b))


def test_numpy_linear_token_stats_peak_memory_stays_within_two_chunks():
    """linear_token_stats and its VJP (API.md 11.4: section 8's bound): beyond the inputs and the
    returned gradients, a few chunks' float32 logits plus O(tokens), the same whatever the tokens."""
    import tracemalloc
    C, chunk = _MEMORY_C, _MEMORY_CHUNK
    peaks = []
    for tokens, h, w, y in _memory_cases():
        cts = {"log_prob": rng0.normal(size=tokens).astype(np.float32),
               "entropy": rng0.normal(size=tokens).astype(np.float32)}
        kw = dict(layout="NH", chunk_size=chunk, temperature=0.7)
        xsl.linear_token_stats_vjp(h[:chunk], w, y[:chunk], {k: v[:chunk] for k, v in cts.items()}, **kw)
        tracemalloc.start()
        s = xsl.linear_token_stats(h, w, y, **kw)
        fwd = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        dh, dw, _ = xsl.linear_token_stats_vjp(h, w, y, cts, **kw)
        bwd = tracemalloc.get_traced_memory()[1] - dh.nbytes - dw.nbytes
        tracemalloc.stop()
        peaks.append((fwd, bwd))
        assert np.all(np.asarray(s.log_prob) <= 0)
    # a block of the block-wise kernels (core/stats_chunks.py, ~8 MB) holds this whole 2 MB chunk,
    # so the formula's few chunk-sized temporaries (x / T, the shifted logits, exp, the entropy
    # terms) are all here at once; what may not happen is growth with the tokens: twice the
    # tokens, the same peak
    (f0, b0), (f1, b1) = peaks
    for what, p0, p1 in (("forward", f0, f1), ("vjp", b0, b1)):
        assert p1 <= 12 * chunk * C * 4 + 256 * 4096 + (1 << 20), (what, p1)
        assert abs(p1 - p0) <= 0.1 * p0 + 256 * 2048, (what, p0, p1)
        assert p1 < 0.5 * 4096 * C * 4, (what, p1)


def test_torch_linear_token_stats_never_allocates_the_logits():
    """linear_token_stats forward and backward through autograd (both outputs' upstream): no tensor
    as large as a third of the logits is ever allocated."""
    require_or_skip("torch")
    import torch
    from torch.profiler import ProfilerActivity, profile
    tokens, H, C, chunk = 4096, 64, 4096, 256
    h = torch.randn(tokens, H, requires_grad=True)
    w = torch.randn(C, H, requires_grad=True)
    y = torch.randint(0, C, (tokens,))
    g1, g2 = torch.randn(tokens), torch.randn(tokens)

    def step(hh, yy, a, b):
        s = xsl.linear_token_stats(hh, w, yy, layout="NH", chunk_size=chunk, temperature=0.7)
        torch.autograd.backward([s.log_prob, s.entropy], [a, b])
    step(h[:chunk], y[:chunk], g1[:chunk], g2[:chunk])
    h.grad = w.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(h, y, g1, g2)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    logits = tokens * C * 4
    assert biggest <= chunk * C * 4 + 1024, (biggest, logits)
    assert biggest < logits / 3
    assert float(h.grad.abs().sum()) > 0 and float(w.grad.abs().sum()) > 0
