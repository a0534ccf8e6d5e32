"""xseqloss.hf under Hugging Face transformers (issue 28, item 1), on a tiny random LlamaForCausalLM
built from its config (never downloaded): hidden 32, 2 layers, vocabulary 64.

References are transformers' own loss (``ForCausalLMLoss``, where it is right) and
``torch.nn.functional.cross_entropy`` per document, with gradients from torch's autograd:

(a) the default call (as ``model.loss_function`` and as ``compute_loss_func``) equals transformers'
    loss and every parameter's gradient, with and without ``num_items_in_batch`` and ``shift_labels``;
(b) gradient accumulation 2 and 4 over uneven rows equals the large batch, for "mean" and
    "segment_mean", by hand and (mean) through ``Trainer``;
(c) a packed batch (``DataCollatorWithFlattening``) equals the same documents unpacked, with the
    boundaries from ``position_ids`` and from ``seq_idx``;
(d) ``linear_cross_entropy`` on the last hidden state and ``lm_head.weight`` (tied or not) equals the
    materialised loss, and no (tokens x vocabulary) tensor is formed.
"""

import numpy as np
import pytest

from helpers.support import assert_close, import_or_skip

torch = import_or_skip("torch")
transformers = import_or_skip("transformers")

import torch.nn.functional as F  # noqa: E402

import xseqloss as xsl  # noqa: E402
import xseqloss.hf as xh  # noqa: E402

V = 64
TOL = 2e-6  # float32: the same logits, sums in another order


def _model(tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def _grads(model):
    g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return g


def _same_grads(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a.double().numpy(), b.double().numpy(), tol=TOL, what=f"{what}: parameter {i}")


def _padded(lengths, seed=1):
    """Right-padded rows of these lengths: input_ids, attention_mask, labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, V, (len(lengths), T), generator=g)
    am = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    labels = torch.where(am.bool(), ids, -100)
    return ids, am, labels


# ------------------------------------------------------------------------------------------- (a)


def test_default_call_equals_transformers_loss_and_gradients():
    model = _model()
    ids, am, labels = _padded([7, 4, 6])
    labels[0, 2] = -100  # an ignored token inside a row
    n = int(xsl.token_count(labels, shift=1))
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    cases = [dict(), dict(num_items_in_batch=torch.tensor(2 * n)), dict(shift_labels=shifted)]
    for kw in cases:
        model.loss_function = transformers.loss.loss_utils.ForCausalLMLoss  # transformers' own
        want = model(input_ids=ids, attention_mask=am, labels=labels, **kw).loss
        want.backward()
        gw = _grads(model)
        loss = xh.CausalLMLoss()
        model.loss_function = loss  # the model's hook
        got = model(input_ids=ids, attention_mask=am, labels=labels, **kw).loss
        got.backward()
        assert_close(got.item(), want.item(), tol=TOL, what=f"loss_function {sorted(kw)}")
        _same_grads(_grads(model), gw, f"loss_function {sorted(kw)}")
        # Trainer's form: outputs, labels, num_items_in_batch (a count is needed with gradients on)
        out = model(input_ids=ids, attention_mask=am)
        items = kw.get("num_items_in_batch", n)
        got = loss(out, labels, num_items_in_batch=items) if "shift_labels" not in kw else \
            loss(out, None, num_items_in_batch=items, shift_labels=shifted)
        got.backward()
        assert_close(got.item(), want.item(), tol=TOL, what=f"compute_loss_func {sorted(kw)}")
        _same_grads(_grads(model), gw, f"compute_loss_func {sorted(kw)}")


def test_errors_instead_of_an_unscaled_or_unshifted_loss():
    model = _model()
    ids, am, labels = _padded([5, 3])
    out = model(input_ids=ids, attention_mask=am)
    loss = xh.CausalLMLoss()
    # Trainer treats compute_loss_func's loss as scaled for accumulation: no silent local mean
    with pytest.raises(xsl.XSeqLossError, match="num_items_in_batch is None: Trainer treats"):
        loss(out, labels)
    with torch.no_grad():  # evaluation (no gradient): the local mean, as transformers
        assert_close(loss(model(input_ids=ids, attention_mask=am), labels).item(),
                     model(input_ids=ids, attention_mask=am, labels=labels).loss.item(), tol=TOL)
    seg = xh.CausalLMLoss(reduction="segment_mean")
    with pytest.raises(xsl.XSeqLossError, match="needs document boundaries"):
        seg(out, labels, num_items_in_batch=5)
    segs = torch.zeros_like(labels)
    with pytest.raises(xsl.XSeqLossError, match="num_items_in_batch=11 while this batch has 6 labels"):
        seg(out, labels, num_items_in_batch=11, segment_ids=segs)  # accumulation: a token count is no divisor
    n = int(xsl.token_count(labels, shift=1))
    assert_close(seg(out, labels, num_items_in_batch=n, segment_ids=segs).item(),  # no accumulation
                 seg(out, labels, normalizer=2, segment_ids=segs).item(), tol=TOL)
    with pytest.raises(xsl.XSeqLossTypeError, match="takes shift from each call"):
        xh.CausalLMLoss(shift=0)
    with pytest.raises(xsl.XSeqLossError, match="reduction='sum' is not valid here"):
        xh.CausalLMLoss(reduction="sum")
    with pytest.raises(xsl.XSeqLossError, match="num_classes"):  # vocab_size is checked against the logits
        loss(logits=out.logits, labels=labels, vocab_size=V + 1)


# ------------------------------------------------------------------------------------------- (b)


def _doc_mean_reference(logits, labels, segs):
    """Mean over documents of each document's mean shifted cross-entropy (F.cross_entropy)."""
    losses = []
    for n in range(labels.shape[0]):
        for d in torch.unique(segs[n][segs[n] >= 0]):
            pos = torch.nonzero(segs[n] == d).ravel()
            z, y = logits[n, pos[:-1]], labels[n, pos[1:]]
            if (y != -100).any():
                losses.append(F.cross_entropy(z.float(), y, ignore_index=-100))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("reduction", ["mean", "segment_mean"])
@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_equals_the_large_batch(steps, reduction):
    model = _model()
    lengths = [9, 3, 6, 8, 2, 7, 6, 9]  # every document 2 tokens or more
    ids, am, labels = _padded(lengths, seed=steps)
    segs = torch.where(am.bool(), (torch.arange(ids.shape[1])[None] >= 4).long(), -1)  # 2 documents a row (1 if short)
    if reduction == "mean":
        want = model(input_ids=ids, attention_mask=am, labels=labels).loss  # transformers' own, full batch
    else:
        want = _doc_mean_reference(model(input_ids=ids, attention_mask=am).logits, labels, segs)
    want.backward()
    gw = _grads(model)
    loss = xh.CausalLMLoss(reduction=reduction)
    n_items = xsl.token_count(labels, shift=1)  # the window's shifted labels, as the Trainer counts them
    n_docs = xsl.segment_count(segs).sum()      # the window's documents
    total = 0.0
    for part in torch.arange(len(lengths)).chunk(steps):
        out = model(input_ids=ids[part], attention_mask=am[part])
        if reduction == "mean":
            micro = loss(out, labels[part], num_items_in_batch=n_items)
        else:
            micro = loss(out, labels[part], segment_ids=segs[part], normalizer=n_docs)
        micro.backward()
        total += micro.item()
    assert_close(total, want.item(), tol=TOL, what="accumulated loss")
    _same_grads(_grads(model), gw, f"accumulation {steps}, {reduction}")


def _collate(rows):
    lengths = [len(r["input_ids"]) for r in rows]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :lengths[i]] = torch.tensor(r["input_ids"])
    am = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": am, "labels": torch.where(am.bool(), ids, -100)}


def test_trainer_accumulation_2_steps_like_the_full_batch(tmp_path):
    """One SGD step of Trainer with compute_loss_func and gradient_accumulation_steps=2 over the 4
    rows = one step on the whole batch's mean (whatever order the sampler picks)."""
    import_or_skip("accelerate")
    lengths = [9, 3, 6, 2]
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": torch.randint(0, V, (n,), generator=g).tolist()} for n in lengths]
    model, ref = _model(seed=3), _model(seed=3)
    batch = _collate(rows)
    ref(**batch).loss.backward()
    lr = 0.5
    want = [p.detach() - lr * p.grad for p in ref.parameters()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=1, learning_rate=lr,
                                          optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                                          max_grad_norm=0.0, use_cpu=True, report_to="none", save_strategy="no",
                                          disable_tqdm=True, logging_steps=1, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=_collate,
                                   compute_loss_func=xh.CausalLMLoss())
    trainer.train()
    for i, (p, w) in enumerate(zip(model.parameters(), want)):
        assert_close(p.detach().double().numpy(), w.double().numpy(), tol=TOL, what=f"parameter {i}")


# ------------------------------------------------------------------------------------------- (c)


@pytest.mark.parametrize("reduction", ["mean", "segment_mean"])
def test_packed_batch_equals_the_documents_unpacked(reduction):
    model = _model(seed=1)
    lengths = [5, 3, 7, 4]
    ids, am, labels = _padded(lengths, seed=7)
    if reduction == "mean":
        want = model(input_ids=ids, attention_mask=am, labels=labels).loss
    else:
        want = _doc_mean_reference(model(input_ids=ids, attention_mask=am).logits, labels,
                                   torch.where(am.bool(), 0, -1))
    want.backward()
    gw = _grads(model)
    docs = [{"input_ids": ids[i, :n].tolist()} for i, n in enumerate(lengths)]
    packed = transformers.DataCollatorWithFlattening(return_seq_idx=True)(docs)
    assert tuple(packed["input_ids"].shape) == (1, sum(lengths))
    loss = xh.use(model, reduction=reduction)  # the model's loss_function + the batch's boundaries
    by_positions = {k: v for k, v in packed.items() if k != "seq_idx"}
    flash = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(docs)  # cu_seq_lens_q
    assert "cu_seq_lens_q" in flash and "seq_idx" not in flash
    for what, batch in (("seq_idx", packed), ("position_ids", by_positions), ("cu_seq_lens_q", flash)):
        got = model(**batch).loss
        got.backward()
        assert_close(got.item(), want.item(), tol=TOL, what=f"loss_function, {what}")
        _same_grads(_grads(model), gw, f"loss_function, {what}")
        # Trainer's form: the labels popped, the model called on the rest, then the loss
        rest = {k: v for k, v in batch.items() if k != "labels"}
        n = xsl.token_count(batch["labels"], shift=1)
        got = loss(model(**rest), batch["labels"], num_items_in_batch=n if reduction == "mean" else None,
                   normalizer=None if reduction == "mean" else len(lengths))
        got.backward()
        assert_close(got.item(), want.item(), tol=TOL, what=f"compute_loss_func, {what}")
        _same_grads(_grads(model), gw, f"compute_loss_func, {what}")
    # the boundaries from position_ids alone, without the -100 separators: still no cross-document target
    seps = packed["labels"].clone()
    starts = torch.tensor(np.cumsum([0] + lengths[:-1]))
    seps[0, starts] = packed["input_ids"][0, starts]
    assert_close(loss(logits=model(**{k: v for k, v in by_positions.items() if k != "labels"}).logits,
                      labels=seps, position_ids=packed["position_ids"],
                      normalizer=None if reduction == "mean" else len(lengths)).item(),
                 want.item(), tol=TOL, what="position_ids without separators")
    model.zero_grad(set_to_none=True)
    assert xh.segment_ids_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist() == [[0, 0, 0, 1, 1, 2]]


# ------------------------------------------------------------------------------------------- (d)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_linear_cross_entropy_on_lm_head_equals_the_materialised_loss(tied):
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _model(tied=tied, seed=2)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, am, labels = _padded([10, 5, 7, 9], seed=3)  # 40 tokens x 64 classes > any other tensor here
    want = model(input_ids=ids, attention_mask=am, labels=labels).loss
    want.backward()
    gw = _grads(model)

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    h = model.model(input_ids=ids, attention_mask=am).last_hidden_state
    hd = h.detach().requires_grad_()
    with Largest():  # the loss and its backward to the hidden state and lm_head.weight
        got = xsl.linear_cross_entropy(hd, model.lm_head.weight, labels, shift=1, chunk_size=4)
        got.backward()
    h.backward(hd.grad)
    assert_close(got.item(), want.item(), tol=TOL, what="linear_cross_entropy")
    _same_grads(_grads(model), gw, f"linear_cross_entropy, tied={tied}")
    assert Largest.numel < ids.numel() * V  # never the (tokens x vocabulary) logits
