"""Run by tests/test_keras_loss.py in a fresh interpreter per Keras backend (Keras picks its backend at
import, from KERAS_BACKEND). Trains a tiny masked sequence model with xseqloss.keras.SequenceCrossEntropy
and prints one JSON line of facts for the test to assert on:

* the Keras backend actually in use;
* what the loss saw at its boundary with xseqloss's core during fit (label dtype, whether a Keras mask
  was found, the logits' static shape: None dims under tf.function, tracers under jax.jit);
* fit's per-epoch losses;
* evaluate() on one batch (the Keras mask, sample weights per token and per sample) and the same
  quantity computed directly by sequence_cross_entropy in float64 from predict()'s logits, with the
  mask built here from the inputs (x != 0) rather than taken from Keras;
* the loss after a model.save / load_model round trip;
* float64 labels (exact integers) in evaluate and fit, with ``normalizer="global"``, and its round trip.
"""

import json
import os
import sys
import tempfile

import numpy as np

# Everything else happens in main(): pytest's --doctest-modules imports this file while collecting, and
# that import must not pick a Keras backend or patch xseqloss.keras in the test process.


def main():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    import xseqloss as xsl
    import xseqloss.keras as xk

    seen = []
    core = xk.sequence_cross_entropy

    def spy(logits, targets, **kw):  # what reaches xseqloss's core from inside fit
        fact = {
            "targets_dtype": keras.backend.standardize_dtype(targets.dtype),
            "mask": kw.get("mask") is not None,
            "weights": kw.get("weights") is not None,
            "logits_shape": [None if d is None else int(d) for d in logits.shape],
            "logits_type": type(logits).__name__,
        }
        if fact not in seen:
            seen.append(fact)
        return core(logits, targets, **kw)

    xk.sequence_cross_entropy = spy

    keras.utils.set_random_seed(0)
    V, C, N, T = 12, 6, 90, 7  # 90 = 5 * 16 + 10: a partial last batch
    rng = np.random.default_rng(0)
    x = rng.integers(1, V, (N, T))
    lengths = rng.integers(2, T + 1, N)
    pad = np.arange(T)[None, :] >= lengths[:, None]
    x[pad] = 0
    y = (x % C).astype(np.int64)
    y[pad] = rng.integers(0, C, N * T).reshape(N, T)[pad]  # garbage labels at padding: the mask must hide them
    y[0, 0] = -100  # and an ignored token inside a sequence

    inp = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(V, 16, mask_zero=True)(inp)
    h = keras.layers.GRU(24, return_sequences=True)(h)
    out = keras.layers.Dense(C)(h)
    model = keras.Model(inp, out)
    loss = xk.SequenceCrossEntropy(label_smoothing=0.05)
    model.compile(optimizer=keras.optimizers.Adam(2e-2), loss=loss)

    hist = model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    fit_seen = list(seen)

    pred = np.asarray(keras.ops.convert_to_numpy(model.predict(x, verbose=0)), np.float64)
    mask = x != 0

    def direct(**kw):
        return float(xsl.sequence_cross_entropy(pred, y, label_smoothing=0.05, **kw))

    sw_tok = rng.random((N, T))
    sw_seq = rng.random(N)
    results = {
        "eval": model.evaluate(x, y, batch_size=N, verbose=0),
        "direct": direct(mask=mask),
        "direct_unmasked": direct(),
        "eval_sw_tok": model.evaluate(x, y, sample_weight=sw_tok, batch_size=N, verbose=0),
        "direct_sw_tok": direct(mask=mask, weights=sw_tok),
        "eval_sw_seq": model.evaluate(x, y, sample_weight=sw_seq, batch_size=N, verbose=0),
        "direct_sw_seq": direct(mask=mask, weights=np.repeat(sw_seq[:, None], T, 1)),
    }

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        results["loaded_loss_type"] = type(loaded.loss).__name__
        results["loaded_loss_config"] = loaded.loss.get_config()
        results["eval_loaded"] = loaded.evaluate(x, y, batch_size=N, verbose=0)

    # labels as floats (exact integers: what Keras hands over under MirroredStrategy) and the global
    # normalizer (API.md 9.1; one device: the ordinary mean), on a second compiled model over the same
    # layers: evaluate, a .keras round trip, then fit, whose labels must reach xseqloss as integers
    # (on the PyTorch Keras backend without torch.distributed the one process's batch is the global one)
    gmodel = keras.Model(inp, out)
    gmodel.compile(optimizer=keras.optimizers.Adam(1e-2),
                   loss=xk.SequenceCrossEntropy(label_smoothing=0.05, normalizer="global"))
    y64 = y.astype(np.float64)
    results["eval_float_labels"] = model.evaluate(x, y64, batch_size=N, verbose=0)
    results["eval_global"] = gmodel.evaluate(x, y64, batch_size=N, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "global.keras")
        gmodel.save(path)
        loaded = keras.models.load_model(path)
        results["global_loaded_normalizer"] = loaded.loss.get_config()["normalizer"]
        results["eval_global_loaded"] = loaded.evaluate(x, y64, batch_size=N, verbose=0)
    seen.clear()
    results["float_fit_history"] = gmodel.fit(x, y64, epochs=1, batch_size=16, verbose=0).history["loss"]
    results["float_fit_seen"] = list(seen)

    print(json.dumps({"backend": keras.backend.backend(), "history": hist.history["loss"], "fit_seen": fit_seen,
                      "config": loss.get_config(), **results}))


if __name__ == "__main__":
    sys.exit(main())
