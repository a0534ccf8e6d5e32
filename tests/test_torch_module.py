"""xseqloss.torch.SequenceCrossEntropyLoss: options, buffer, training, torch.compile (API.md section 3)."""

import numpy as np
import pytest

from helpers.support import assert_close, require_or_skip

require_or_skip("torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import xseqloss as xsl  # noqa: E402
from xseqloss.torch import SequenceCrossEntropyLoss  # noqa: E402


def _batch(seed=0, N=3, T=5, C=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N, T), generator=g)
    y[0, 1] = -100
    return x, y


OPTION_SETS = [
    {},
    dict(label_smoothing=0.2, class_weights=[1.0, 2.0, 0.5, 1.0, 3.0, 1.0], z_loss=1e-2),
    dict(reduction="per_sequence", denominator="tokens", logit_softcap=5.0),
    dict(reduction="sum", smoothing="others", label_smoothing=0.1, ignore_index=(-100, 2)),
    dict(reduction="none", empty="nan"),
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_module_equals_function_value_and_grad(opts):
    x, y = _batch()
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    lengths = torch.tensor([5, 3, 4])
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    module = SequenceCrossEntropyLoss(**opts)

    x1 = x.clone().requires_grad_(True)
    got = module(x1, y, mask, lengths, weights)
    got.sum().backward()
    x2 = x.clone().requires_grad_(True)
    fopts = dict(opts)
    if "class_weights" in fopts:
        fopts["class_weights"] = np.asarray(fopts["class_weights"])
    want = xsl.sequence_cross_entropy(x2, y, mask=mask, lengths=lengths, weights=weights, **fopts)
    want.sum().backward()
    assert got.shape == want.shape
    assert_close(got.detach().numpy(), want.detach().numpy(), what="value")
    assert_close(x1.grad.numpy(), x2.grad.numpy(), what="gradient")
    assert x1.grad.abs().sum() > 0


def test_options_are_keyword_only_and_checked_at_construction():
    with pytest.raises(TypeError):
        SequenceCrossEntropyLoss("NCT")  # noqa: the layout must be named
    with pytest.raises(xsl.XSeqLossError, match="reduction='avg'"):
        SequenceCrossEntropyLoss(reduction="avg")
    with pytest.raises(xsl.XSeqLossError, match=r"label_smoothing=1\.5 is out of range"):
        SequenceCrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(xsl.XSeqLossError, match=r"class_weights\[1\] = -1\.0 is invalid"):
        SequenceCrossEntropyLoss(class_weights=[1.0, -1.0, 2.0])
    with pytest.raises(xsl.XSeqLossError, match=r"class_weights has shape \(2, 2\)"):
        SequenceCrossEntropyLoss(class_weights=[[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(xsl.XSeqLossError, match=r"must be \(C=4,\)"):
        SequenceCrossEntropyLoss(class_weights=[1.0, 1.0, 1.0], num_classes=4)
    with pytest.raises(xsl.XSeqLossError, match="normalizer"):
        SequenceCrossEntropyLoss(reduction="sum", normalizer=10)
    with pytest.raises(xsl.XSeqLossError, match='needs inputs="logits"'):
        SequenceCrossEntropyLoss(inputs="probs", z_loss=1e-4)


def test_class_weights_is_a_buffer_that_follows_the_module():
    module = SequenceCrossEntropyLoss(class_weights=[1, 2, 3])  # integers become the default float dtype
    assert dict(module.named_buffers())["class_weights"].dtype == torch.get_default_dtype()
    assert "class_weights" in module.state_dict()
    module.to(torch.float64)
    assert module.class_weights.dtype == torch.float64
    module.to("meta")  # a device move without needing a GPU
    assert module.class_weights.device.type == "meta"
    assert SequenceCrossEntropyLoss().class_weights is None
    assert "class_weights" not in SequenceCrossEntropyLoss().state_dict()

    src = SequenceCrossEntropyLoss(class_weights=[0.5, 1.5, 2.5])
    dst = SequenceCrossEntropyLoss(class_weights=[1.0, 1.0, 1.0])
    dst.load_state_dict(src.state_dict())
    assert dst.class_weights.tolist() == [0.5, 1.5, 2.5]
    cw = torch.tensor([1.0, 2.0])
    module = SequenceCrossEntropyLoss(class_weights=cw)
    cw[0] = 7.0  # the module keeps its own copy
    assert module.class_weights[0] == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_moves_class_weights_and_computes_there():
    module = SequenceCrossEntropyLoss(class_weights=[1.0, 2.0, 3.0, 1.0, 1.0, 1.0]).to("cuda")
    assert module.class_weights.device.type == "cuda"
    x, y = _batch()
    got = module(x.cuda(), y.cuda())
    assert got.device.type == "cuda"
    want = SequenceCrossEntropyLoss(class_weights=[1.0, 2.0, 3.0, 1.0, 1.0, 1.0])(x, y)
    assert_close(got.cpu().numpy(), want.numpy())


def test_forward_normalizer_overrides_and_repr():
    x, y = _batch()
    module = SequenceCrossEntropyLoss(normalizer=100.0)
    total = SequenceCrossEntropyLoss(reduction="sum")(x, y)
    assert_close(module(x, y).numpy(), (total / 100.0).numpy())
    assert_close(module(x, y, normalizer=torch.tensor(7.0)).numpy(), (total / 7.0).numpy())
    r = repr(SequenceCrossEntropyLoss(layout="NCT", label_smoothing=0.1, class_weights=[1.0, 2.0]))
    assert r == "SequenceCrossEntropyLoss(layout='NCT', label_smoothing=0.1, class_weights=<(2,) buffer>)"


def test_validation_errors_in_eager_forward():
    x, y = _batch()
    y[2, 3] = 6
    with pytest.raises(xsl.XSeqLossError, match=r"targets\[2, 3\] = 6 is out of range"):
        SequenceCrossEntropyLoss()(x, y)
    # validate=False: the bad token gives NaN instead, only there
    out = SequenceCrossEntropyLoss(reduction="none", validate=False)(x, y)
    assert torch.isnan(out[2, 3]) and torch.isnan(out).sum() == 1


class _Tagger(nn.Module):
    def __init__(self, vocab, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.rnn = nn.GRU(16, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.out(self.rnn(self.emb(tokens))[0])  # (N, T, V): layout "NTC"


def _copy_task(rng, n, T, vocab):
    """Delayed copy: target[t] = input[t - 1]; step 0 has no target; padding after each length."""
    lengths = rng.integers(3, T + 1, size=n)
    tokens = rng.integers(1, vocab, size=(n, T))
    targets = np.full((n, T), -100)
    targets[:, 1:] = tokens[:, :-1]
    steps = np.arange(T)[None, :]
    tokens[steps >= lengths[:, None]] = 0  # pad id 0
    targets[steps >= lengths[:, None]] = rng.integers(0, vocab, size=(n, T))[steps >= lengths[:, None]]  # garbage
    return torch.as_tensor(tokens), torch.as_tensor(targets), torch.as_tensor(lengths)


@pytest.fixture
def one_thread():
    # tiny ops: intra-op threads only contend on a shared machine (13 s vs 0.3 s measured)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_trains_a_gru_on_a_delayed_copy_task(one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vocab, T = 8, 10
    model = _Tagger(vocab)
    loss_fn = SequenceCrossEntropyLoss(label_smoothing=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(100):
        tokens, targets, lengths = _copy_task(rng, 32, T, vocab)
        loss = loss_fn(model(tokens), targets, lengths=lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[0] > 1.8  # about log(8) = 2.08 at the start
    assert np.mean(losses[-10:]) < 0.45 * losses[0], losses[::10]
    # the model really copies: accuracy on the steps that count
    tokens, targets, lengths = _copy_task(np.random.default_rng(1), 64, T, vocab)
    with torch.no_grad():
        pred = model(tokens).argmax(-1)
    counted = (torch.arange(T)[None, :] < lengths[:, None]) & (targets != -100)
    assert (pred[counted] == targets[counted]).float().mean() > 0.9


@pytest.fixture(scope="module")
def compiled():
    """One module compiled once (fullgraph: a graph break is an error) for the tests below."""
    module = SequenceCrossEntropyLoss(label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5, 1.0, 1.0, 3.0],
                                      z_loss=1e-3)
    return module, torch.compile(module, fullgraph=True)


def _compile_inputs():
    x, y = _batch(N=3, T=5, C=6)
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    lengths = torch.tensor([5, 3, 4])
    weights = torch.linspace(0.5, 2.0, 15, dtype=torch.float64).reshape(3, 5)
    return x, y, mask, lengths, weights


def test_compiled_module_has_no_graph_break_and_gives_the_eager_result(compiled):
    module, cmodule = compiled
    x, y, mask, lengths, weights = _compile_inputs()
    explanation = torch._dynamo.explain(module)(x, y, mask, lengths, weights)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    eager = module(xe, y, mask, lengths, weights)
    comp = cmodule(xc, y, mask, lengths, weights)
    eager.backward()
    comp.backward()
    assert_close(comp.detach().numpy(), eager.detach().numpy(), what="compiled value")
    assert_close(xc.grad.numpy(), xe.grad.numpy(), what="compiled gradient")


def test_compiled_module_keeps_the_nan_contract(compiled):
    module, cmodule = compiled
    x, y, mask, lengths, weights = _compile_inputs()
    y[1, 0] = 6  # out of range, counted
    with pytest.raises(xsl.XSeqLossError, match="out of range"):
        module(x, y, mask, lengths, weights)  # eager: raises
    xc = x.clone().requires_grad_(True)
    out = cmodule(xc, y, mask, lengths, weights)  # compiled: no exception, NaN loss
    assert torch.isnan(out)
    out.backward()
    assert torch.isnan(xc.grad[1, 0]).all()  # the NaN gradient row is at the bad token ...
    assert torch.isnan(xc.grad).any(-1).sum() == 1  # ... and only there (API.md section 2)


def test_inplace_backward_option_reaches_the_core():
    """inplace_backward=True: the same loss and parameter gradients; the logits' storage is reused."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 6).double()
    h = torch.randn(3, 5, 8, dtype=torch.float64)
    x, y = _batch()
    grads, values = [], []
    for inplace in (False, True):
        lin.zero_grad()
        logits = lin(h)
        before = logits.detach().clone()
        loss = SequenceCrossEntropyLoss(label_smoothing=0.1, inplace_backward=inplace)(logits, y)
        loss.backward()
        values.append(loss.item())
        grads.append(lin.weight.grad.clone())
        assert torch.equal(logits.detach(), before) != inplace  # overwritten only when asked
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert_close(grads[1].numpy(), grads[0].numpy(), what="weight gradient")
