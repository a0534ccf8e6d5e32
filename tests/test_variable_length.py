"""Variable-length sequences as users hold them (API.md section 7, issue 12): ragged and packed
inputs, the causal shift, packed documents and pooling. The value and gradient of every form
against the float64 reference are in the conformance suite (cases shift*, segments*, ragged*,
pool*); here: the properties (packing invariance), the memory claim of the shift, the structure
of results and gradients, the errors that name both structures, and the framework objects."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers.support import assert_close, require_or_skip
from test_properties import run_property, vg

import xseqloss as xsl

rng0 = np.random.default_rng(7)


# ------------------------------------------------------------------ packing documents into rows

@st.composite
def documents(draw, max_docs=5, max_len=5, C=4):
    """Documents (logits, targets) of random lengths, and how to pack them into rows of length T."""
    n = draw(st.integers(1, max_docs))
    lens = [draw(st.integers(1, max_len)) for _ in range(n)]
    seed = draw(st.integers(0, 2 ** 16))
    r = np.random.default_rng(seed)
    docs = [(r.normal(size=(m, C)) * 2, r.integers(0, C, size=m)) for m in lens]
    for z, y in docs:  # some ignored targets, so the mean's denominator is not just the length
        y[r.uniform(size=len(y)) < 0.2] = -100
    T = draw(st.integers(max(lens), max(lens) + 6))
    return docs, T


def _pack(docs, T):
    """Documents into rows of length T (greedy), with segment ids and -1 padding; and unpacked,
    one document per row, with lengths."""
    rows, cur = [], []
    for i, (z, y) in enumerate(docs):
        if sum(len(d[1]) for d in cur) + len(y) > T:
            rows.append(cur)
            cur = []
        cur.append((z, y))
    rows.append(cur)
    C = docs[0][0].shape[1]
    N = len(rows)
    Z = np.zeros((N, T, C))
    Y = np.full((N, T), -100)
    S = np.full((N, T), -1)
    for n, row in enumerate(rows):
        t = 0
        for j, (z, y) in enumerate(row):
            Z[n, t:t + len(y)] = z
            Y[n, t:t + len(y)] = y
            S[n, t:t + len(y)] = j % 2  # ids repeat between documents: runs, not values, delimit them
            t += len(y)
    M = max(len(y) for _, y in docs)
    U = np.zeros((len(docs), M, C))
    V = np.full((len(docs), M), -100)
    for i, (z, y) in enumerate(docs):
        U[i, :len(y)] = z
        V[i, :len(y)] = y
    lengths = np.array([len(y) for _, y in docs])
    return (Z, Y, S), (U, V, lengths)


def _rows_of(packed_grad, S, docs):
    """The packed gradient's rows per document, in document order."""
    out = []
    for n in range(S.shape[0]):
        t = 0
        while t < S.shape[1] and S[n, t] >= 0:
            s = t
            while t < S.shape[1] and S[n, t] == S[n, s]:
                t += 1
            out.append(packed_grad[n, s:t])
    return out


def test_packing_documents_changes_nothing(backend):
    """Packed rows with segment_ids give the same "mean", "segment_mean", "per_segment" and
    gradients as the same documents unpacked one per row (mean; sequence_mean; per_sequence),
    with and without shift, with ignored targets and a mask (Liger-Kernel 329, unsloth 1216)."""
    @given(p=documents(), shift=st.sampled_from([0, 1, 2]), masked=st.booleans())
    def check(p, shift, masked):
        docs, T = p
        (Z, Y, S), (U, V, L) = _pack(docs, T)
        Mp = np.ones(Y.shape, bool)
        Mu = np.ones(V.shape, bool)
        if masked:  # drop the second target of every document, in both forms
            for n in range(S.shape[0]):
                starts = [t for t in range(T) if S[n, t] >= 0 and (t == 0 or S[n, t] != S[n, t - 1])]
                for s in starts:
                    if s + 1 < T and S[n, s + 1] == S[n, s]:
                        Mp[n, s + 1] = False
            Mu[:, 1:2] = False  # (documents of one token have no second target)
        kw = dict(shift=shift)
        pm, gpm = vg(backend, Z, Y, mask=Mp, segment_ids=S, reduction="mean", **kw)
        um, gum = vg(backend, U, V, mask=Mu, lengths=L, reduction="mean", **kw)
        assert_close(pm, um, tol=1e-12, what="mean")
        for a, b in zip(_rows_of(gpm, S, docs), gum):
            assert_close(a, b[:len(a)], tol=1e-12, what="mean gradient")
        ps, gps = vg(backend, Z, Y, mask=Mp, segment_ids=S, reduction="segment_mean", **kw)
        us, gus = vg(backend, U, V, mask=Mu, lengths=L, reduction="sequence_mean", **kw)
        assert_close(ps, us, tol=1e-12, what="segment_mean = sequence_mean unpacked")
        for a, b in zip(_rows_of(gps, S, docs), gus):
            assert_close(a, b[:len(a)], tol=1e-12, what="segment_mean gradient")
        per, _ = vg(backend, Z, Y, mask=Mp, segment_ids=S, reduction="per_segment", **kw)
        seq, _ = vg(backend, U, V, mask=Mu, lengths=L, reduction="per_sequence", **kw)
        counts = np.asarray(xsl.segment_count(S))
        flat = np.concatenate([np.asarray(per)[n, :c] for n, c in enumerate(counts)])
        assert_close(flat, seq, tol=1e-12, what="per_segment = per_sequence unpacked")
        assert np.all(np.asarray(per)[np.arange(per.shape[1])[None, :] >= counts[:, None]] == 0)
    run_property(backend, check, scale=0.5)


def test_a_shifted_target_never_crosses_a_document():
    z = rng0.normal(size=(1, 6, 3))
    y = np.array([[0, 1, 2, 0, 1, 2]])
    seg = np.array([[4, 4, 4, 9, 9, -1]])
    out = xsl.sequence_cross_entropy(z, y, segment_ids=seg, shift=1, reduction="none")
    assert out[0, 2] == 0 and out[0, 4] == 0 and out[0, 5] == 0  # last step of each document, padding
    full = xsl.sequence_cross_entropy(z, y, reduction="none", shift=1)
    assert np.allclose(out[0, [0, 1, 3]], full[0, [0, 1, 3]])
    assert int(xsl.token_count(y, segment_ids=seg, shift=1)) == 3


# ------------------------------------------------------------------ shift copies nothing

def test_shift_allocates_nothing_logits_sized_numpy():
    """The shift moves the token-sized target arrays, never the logits: forward and value_and_grad
    allocate no more with shift=1 than without (tracemalloc counts NumPy's buffers)."""
    import tracemalloc
    z = rng0.normal(size=(4, 256, 512)).astype(np.float32)  # 2 MB of logits
    y = rng0.integers(0, 512, size=(4, 256))
    peaks = {}
    for k in (0, 1):
        xsl.value_and_grad(z, y, shift=k)
        xsl.sequence_cross_entropy(z, y, shift=k, label_smoothing=0.1)
        tracemalloc.start()
        xsl.sequence_cross_entropy(z, y, shift=k)
        xsl.sequence_cross_entropy(z, y, shift=k, label_smoothing=0.1, weights=np.ones(y.shape))
        fwd = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        _, g = xsl.value_and_grad(z, y, shift=k)
        vgp = tracemalloc.get_traced_memory()[1] - g.nbytes
        tracemalloc.stop()
        del g
        peaks[k] = (fwd, vgp)
    tokens = y.size * 8
    assert peaks[1][0] <= peaks[0][0] + 8 * tokens, peaks
    assert peaks[1][1] <= peaks[0][1] + 8 * tokens, peaks


def test_shift_allocates_nothing_logits_sized_torch():
    require_or_skip("torch")
    import torch
    from torch.profiler import ProfilerActivity, profile
    z = torch.randn(4, 256, 512, requires_grad=True)
    y = torch.randint(0, 512, (4, 256))
    L = z.numel() * 4
    peaks = {}
    for k in (0, 1):
        xsl.sequence_cross_entropy(z, y, shift=k).backward()
        z.grad = None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            xsl.sequence_cross_entropy(z, y, shift=k).backward()
        events = [e for e in prof.events() if e.cpu_memory_usage > 0]
        peaks[k] = max([e.cpu_memory_usage for e in events] + [0])
        z.grad = None
    # no single allocation of the logits' size beyond the gradient itself, with or without shift
    assert peaks[1] <= max(peaks[0], L), (peaks, L)
    assert peaks[1] < 2 * L


# ------------------------------------------------------------------ ragged: structure and errors

def test_packed_sequence_results_and_gradient_keep_their_structure():
    require_or_skip("torch")
    import torch
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
    z = torch.randn(3, 4, 5)
    y = torch.randint(0, 5, (3, 4))
    lens = torch.tensor([2, 4, 1])
    p = pack_padded_sequence(z, lens, batch_first=True, enforce_sorted=False)
    py = pack_padded_sequence(y, lens, batch_first=True, enforce_sorted=False)
    none = xsl.sequence_cross_entropy(p, py, reduction="none")
    assert isinstance(none, PackedSequence) and torch.equal(none.batch_sizes, p.batch_sizes)
    per = xsl.sequence_cross_entropy(p, py, reduction="per_sequence")
    ref = xsl.sequence_cross_entropy(z, y, lengths=lens, reduction="per_sequence")
    assert torch.allclose(per, ref)  # the caller's order, not the sorted one
    v, g = xsl.value_and_grad(p, py)
    assert isinstance(g, PackedSequence) and g.data.shape == p.data.shape


def test_nested_results_and_gradient():
    require_or_skip("torch")
    import torch
    parts = [torch.randn(n, 5) for n in (3, 1, 4)]
    labels = [torch.randint(0, 5, (n,)) for n in (3, 1, 4)]
    z = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)
    y = torch.nested.nested_tensor(labels, layout=torch.jagged)
    out = xsl.sequence_cross_entropy(z, y, reduction="none")
    assert out.is_nested
    loss = xsl.sequence_cross_entropy(z, y)
    loss.backward()
    assert z.grad is not None and z.grad.is_nested
    padded = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)
    lab = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True)
    ref = xsl.sequence_cross_entropy(padded, lab, lengths=torch.tensor([3, 1, 4]))
    assert torch.allclose(loss, ref)


def test_tf_ragged_in_tf_function_and_gradient():
    require_or_skip("tensorflow")
    import tensorflow as tf
    rows = [rng0.normal(size=(n, 4)) for n in (2, 5, 3)]
    labels = [rng0.integers(0, 4, size=n) for n in (2, 5, 3)]
    z = tf.ragged.constant([r.tolist() for r in rows], ragged_rank=1)
    y = tf.ragged.constant([v.tolist() for v in labels])
    padded = np.zeros((3, 5, 4))
    lab = np.zeros((3, 5), int)
    for i, (r, v) in enumerate(zip(rows, labels)):
        padded[i, :len(r)] = r
        lab[i, :len(v)] = v
    ref, gref = xsl.value_and_grad(padded, lab, lengths=np.array([2, 5, 3]), shift=1)

    @tf.function
    def step(values):
        with tf.GradientTape() as tape:
            tape.watch(values)
            rz = tf.RaggedTensor.from_row_splits(values, z.row_splits)
            loss = xsl.sequence_cross_entropy(rz, y, shift=1)
        return loss, tape.gradient(loss, values)
    loss, g = step(z.flat_values)  # tf.ragged.constant: float32
    assert_close(loss.numpy(), ref, "float32")
    gflat = np.concatenate([gref[i, :n] for i, n in enumerate((2, 5, 3))])
    assert_close(g.numpy(), gflat, "float32")
    none = xsl.sequence_cross_entropy(z, y, reduction="none")
    assert isinstance(none, tf.RaggedTensor)


@pytest.mark.parametrize("what", ["too_long", "count", "lengths"])
def test_list_structure_errors_name_both(backend, what):
    z = np.zeros((2, 3, 4))
    if what == "too_long":
        y = [np.array([1, 2]), np.array([1, 2, 3, 0])]
        match = r"targets\[1\] has 4 steps but the logits have T = 3"
        kw = {}
    elif what == "count":
        y = [np.array([1, 2])]
        match = "targets is a list of 1 sequences but the logits have N = 2"
        kw = {}
    else:
        y = [np.array([1, 2]), np.array([1])]
        match = r"lengths=\[2, 2\] differ from the lengths of the ragged lists \[2, 1\]"
        kw = dict(lengths=np.array([2, 2]))
    with pytest.raises(xsl.XSeqLossError, match=match):
        xsl.sequence_cross_entropy(backend.array(z), [backend.array(v) for v in y], **kw)


def test_mismatched_packed_pair_and_nested_are_errors():
    require_or_skip("torch")
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence
    z = torch.randn(2, 3, 4)
    p = pack_padded_sequence(z, torch.tensor([3, 2]), batch_first=True)
    q = pack_padded_sequence(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 1]), batch_first=True)
    with pytest.raises(xsl.XSeqLossError, match=r"targets.batch_sizes \[2, 1, 1\].*differ from the logits' \[2, 2, 1\]"):
        xsl.sequence_cross_entropy(p, q)
    with pytest.raises(xsl.XSeqLossError, match=r"targets is a list with lengths \[3, 1\].*lengths \[3, 2\]"):
        xsl.sequence_cross_entropy(p, [torch.zeros(3, dtype=torch.long), torch.zeros(1, dtype=torch.long)])
    zn = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged)
    yn = torch.nested.nested_tensor([torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)],
                                    layout=torch.jagged)
    with pytest.raises(xsl.XSeqLossError, match=r"targets has row lengths \[3, 2\] but the nested logits have \[2, 3\]"):
        xsl.sequence_cross_entropy(zn, yn)


def test_mismatched_ragged_rows_are_errors():
    require_or_skip("tensorflow")
    import tensorflow as tf
    z = tf.ragged.constant([[[0.0, 1.0]], [[1.0, 0.0], [0.5, 0.5]]], ragged_rank=1)
    y = tf.ragged.constant([[0, 1], [1]])
    with pytest.raises(xsl.XSeqLossError, match=r"targets has row lengths \[2, 1\] but the RaggedTensor logits have \[1, 2\]"):
        xsl.sequence_cross_entropy(z, y)


def test_token_count_of_ragged_targets(backend):
    y = [backend.array(np.array([1, -100, 2])), backend.array(np.array([3, 1]))]
    assert int(backend.float_out(xsl.token_count(y))) == 4
    assert int(backend.float_out(xsl.token_count(y, shift=1))) == 2  # targets -100, 2 / 1


# ------------------------------------------------------------------ Hugging Face ForCausalLMLoss

def _hf_for_causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index=-100):
    """transformers/loss/loss_utils.py ForCausalLMLoss + fixed_cross_entropy, transliterated (the
    formula as a fact; this code is ours): pad labels with -100 on the right, drop the first,
    cross-entropy over the flattened tokens, sum / num_items_in_batch or the mean."""
    import torch
    import torch.nn.functional as F
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    V = logits.shape[-1]
    red = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=red)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


@pytest.mark.parametrize("with_count", [False, True])
def test_hf_for_causal_lm_preset_reproduces_its_shift_and_count(with_count):
    require_or_skip("torch")
    import torch
    torch.manual_seed(0)
    batches = [(torch.randn(2, 6, 11, requires_grad=True), torch.randint(0, 11, (2, 6))) for _ in range(3)]
    for _, y in batches:
        y[0, 2] = -100
    n = sum(int(xsl.token_count(y, shift=1)) for _, y in batches) if with_count else None
    for x, y in batches:
        theirs = _hf_for_causal_lm_loss(x, y, n)
        (gt,) = torch.autograd.grad(theirs, x)
        ours = xsl.sequence_cross_entropy(x, y, normalizer=n, **xsl.presets.HF_FOR_CAUSAL_LM)
        (go,) = torch.autograd.grad(ours, x)
        assert_close(ours.item(), theirs.item(), "float32")
        assert_close(go.numpy(), gt.numpy(), "float32")
    # the classic mistake: counting the unshifted labels (transformers PR 46204) is not the same
    if with_count:
        unshifted = sum(int((y != -100).sum()) for _, y in batches)
        assert unshifted != n


# ------------------------------------------------------------------ framework objects

def test_torch_module_takes_shift_and_segment_ids():
    require_or_skip("torch")
    import torch
    from xseqloss.torch import SequenceCrossEntropyLoss
    z = torch.randn(2, 6, 4)
    y = torch.randint(0, 4, (2, 6))
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 3, 3]])
    fn = SequenceCrossEntropyLoss(shift=1, reduction="segment_mean")
    assert "shift=1" in repr(fn)
    got = fn(z, y, segment_ids=seg)
    want = xsl.sequence_cross_entropy(z, y, shift=1, segment_ids=seg, reduction="segment_mean")
    assert torch.allclose(got, want)


def test_keras_loss_takes_shift_and_segments_in_targets():
    require_or_skip("tensorflow")
    import keras
    import tensorflow as tf
    from xseqloss.keras import SequenceCrossEntropy
    z = rng0.normal(size=(2, 6, 4)).astype(np.float32)
    y = rng0.integers(0, 4, size=(2, 6))
    seg = np.array([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 3, 3]])
    want = xsl.sequence_cross_entropy(z, y, shift=1, segment_ids=seg, reduction="segment_mean")
    loss = SequenceCrossEntropy(shift=1, reduction="segment_mean", segments_in_targets=True)
    got = loss(np.stack([y, seg], -1), tf.constant(z))
    assert_close(float(got), float(want), "float32")
    assert_close(float(SequenceCrossEntropy(shift=1, reduction="segment_mean")(y, tf.constant(z), segment_ids=seg)),
                 float(want), "float32")
    cfg = loss.get_config()
    assert cfg["shift"] == 1 and cfg["segments_in_targets"] is True
    assert SequenceCrossEntropy.from_config(cfg).shift == 1
    assert keras.backend.backend() in ("tensorflow", "jax", "torch", "numpy")


def test_keras_loss_with_ragged_inputs_on_tensorflow():
    require_or_skip("tensorflow")
    import tensorflow as tf
    from xseqloss.keras import SequenceCrossEntropy
    z = tf.ragged.constant([[[0.0, 1.0, 2.0]], [[1.0, 0.0, 0.0], [0.5, 0.5, 3.0]]], ragged_rank=1)
    y = tf.ragged.constant([[2], [0, 1]])
    padded = np.array([[[0.0, 1.0, 2.0], [0, 0, 0]], [[1.0, 0.0, 0.0], [0.5, 0.5, 3.0]]])
    want = xsl.sequence_cross_entropy(padded, np.array([[2, 0], [0, 1]]), lengths=np.array([1, 2]))
    assert_close(float(SequenceCrossEntropy()(y, z)), float(want), "float32")
    assert_close(float(tf.function(lambda a, b: SequenceCrossEntropy()(a, b))(y, z)), float(want), "float32")


def test_crosscheck_takes_segment_ids_and_shift(tmp_path, capsys):
    from xseqloss.cli import main
    logits = rng0.normal(size=(2, 6, 4)).astype(np.float32)
    targets = rng0.integers(0, 4, size=(2, 6))
    seg = np.array([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 3, 3]])
    path = tmp_path / "packed.npz"
    np.savez(path, logits=logits, targets=targets, segment_ids=seg)
    assert main(["crosscheck", str(path), "--shift", "1", "--reduction", "segment_mean", "--backends", "numpy"]) == 0
    out = capsys.readouterr().out
    want = xsl.sequence_cross_entropy(logits.astype(np.float64), targets, shift=1, segment_ids=seg,
                                      reduction="segment_mean")
    assert "ok" in out and f"value {float(want):.10g}" in out  # the reference line, float64


def test_cli_keeps_tensorflow_start_up_lines_out():
    """The command line imports TensorFlow through _quiet.tensorflow_quietly (cli._quiet): its C++
    start-up lines stay off the terminal, unless the user set TF_CPP_MIN_LOG_LEVEL themselves."""
    require_or_skip("tensorflow")
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XSEQLOSS_QUIET_TENSORFLOW")}
    code = ("from xseqloss.cli import _quiet; _quiet(); import tensorflow as tf; "
            "print(float(tf.reduce_sum(tf.ones([2], tf.float16))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]
    noise = [line for line in proc.stderr.splitlines() if "absl" in line or "oneDNN" in line or "0000 " in line]
    assert not noise, noise
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # the user's own choice: TensorFlow's lines are theirs
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "oneDNN" in proc.stderr or "I0000" in proc.stderr
