"""Which framework owns an array, without importing any (einops' rule: only frameworks already in
``sys.modules`` are looked at), and the side arrays of a call moved to the logits' framework and
device (another framework's array is a TypeError that says how to convert it)."""

from __future__ import annotations

import sys
from typing import Any

from .._errors import XSeqLossTypeError


def framework_of(x: Any) -> str | None:
    """The framework that owns ``x`` (None for NumPy arrays and Python values); never imports one."""
    mods = sys.modules
    torch = mods.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    jax = mods.get("jax")
    if jax is not None and isinstance(x, (jax.Array, jax.core.Tracer)):
        return "jax"
    tf = mods.get("tensorflow")
    if tf is not None and hasattr(tf, "Tensor") and isinstance(x, (tf.Tensor, tf.Variable)):
        return "tensorflow"
    return None


_TYPE_NAME = {"torch": "a torch.Tensor", "jax": "a jax.Array", "tensorflow": "a tf.Tensor"}
_HOW_TO = {
    "numpy": "np.asarray(x)",
    "torch": "torch.as_tensor(np.asarray(x), device=logits.device)",
    "tensorflow": "tf.convert_to_tensor(np.asarray(x))",
    "jax": "jnp.asarray(np.asarray(x))",
}
_TO_NUMPY = {"torch": "x.detach().cpu().numpy()", "jax": "np.asarray(x)", "tensorflow": "x.numpy()"}


def convert_hint(target: str, owner: str, argument: str) -> str:
    """How to turn ``owner``'s array named ``argument`` into ``target``'s, as code."""
    host = _TO_NUMPY[owner].replace("x", argument)
    return _HOW_TO[target].replace("np.asarray(x)", host) if target != "numpy" else host


def side(be: Any, x: Any, argument: str, like: Any) -> Any:
    """A side argument as ``be``'s array on the logits' device; another framework's array is a TypeError."""
    if x is None:
        return None
    owner = framework_of(x)
    if owner is not None and owner != be.name:
        raise XSeqLossTypeError(
            f"{argument} is {_TYPE_NAME[owner]} but logits are {be.type_name}: convert it first, "
            f"e.g. {argument} = {convert_hint(be.name, owner, argument)}")
    if owner == be.name:
        return be.to_device(x, like)
    return be.convert(x, argument, like=like)
