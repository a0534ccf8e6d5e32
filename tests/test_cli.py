"""The command line: ``xseqloss crosscheck`` (xseqloss/cli.py) on a saved batch against the float64
reference, found wrong by the adversarial hunt of issue 17 (item 4): ``--ignore-index -100,2`` was
refused, and a backend giving NaN (where the reference is finite, or where it found the input
invalid) was not flagged as a disagreement."""

import numpy as np


def test_crosscheck_negative_ignore_list_and_nan_flagged(tmp_path, capsys, monkeypatch):
    from xseqloss.cli import main
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, -100, 2], [2, 4, 0]])
    path = tmp_path / "batch.npz"
    np.savez(path, logits=logits, targets=targets)
    assert main(["crosscheck", str(path), "--ignore-index", "-100,2", "--backends", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "DISAGREES" not in out

    # a backend that gives NaN where the reference is finite is a disagreement, exit status 1
    from xseqloss.internals import backend
    cls = type(backend("numpy"))
    real = cls.run

    def nan_run(self, fn, st, *arrays):
        out = real(self, fn, st, *arrays)
        if isinstance(out, tuple):  # (loss, value-check flags)
            return (out[0] * np.nan,) + out[1:]
        return out * np.nan if isinstance(out, np.ndarray) and out.dtype.kind == "f" else out
    monkeypatch.setattr(cls, "run", nan_run)
    monkeypatch.setattr(cls, "default_token_loss", lambda self, *a: None)
    assert main(["crosscheck", str(path), "--backends", "numpy"]) == 1
    assert "DISAGREES" in capsys.readouterr().out


def test_crosscheck_invalid_input_nan_is_flagged(tmp_path, capsys, monkeypatch):
    """The reference cannot compute a bad label; a backend that returns NaN there instead of
    raising is flagged (it did not say the input is bad): JAX under eager jax.grad used to."""
    from xseqloss.cli import main
    logits = np.zeros((1, 2, 3), np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, logits=logits, targets=np.array([[1, 7]]))
    assert main(["crosscheck", str(path), "--backends", "numpy", "jax"]) == 1
    assert "numpy/cpu              error: XSeqLossError" in capsys.readouterr().out
    from xseqloss.internals import backend
    cls = type(backend("numpy"))
    monkeypatch.setattr(cls, "run", lambda self, fn, st, *a: (np.asarray(np.nan, np.float32), None))
    monkeypatch.setattr(cls, "default_token_loss", lambda self, *a: None)
    assert main(["crosscheck", str(path), "--backends", "numpy"]) == 1
    assert "NaN where the reference found the input invalid" in capsys.readouterr().out
