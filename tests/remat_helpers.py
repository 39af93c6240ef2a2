"""Checks shared by the stage-1 and stage-2 `model.remat` tests."""

import jax
import numpy as np


def assert_remat_changes_only_the_program(plain_loss, remat_loss, params):
    """`plain_loss(params)` and `remat_loss(params)` give the same value and gradients, and
    only the remat one's program holds a checkpoint (what recomputes in the backward pass)."""
    values = {}
    for name, loss in (("plain", plain_loss), ("remat", remat_loss)):
        fn = jax.value_and_grad(loss)
        values[name] = jax.jit(fn)(params)
        jaxpr = str(jax.make_jaxpr(fn)(params))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (name == "remat"), name
    np.testing.assert_allclose(values["remat"][0], values["plain"][0], rtol=1e-6)
    grads = [jax.tree_util.tree_leaves(values[name][1]) for name in ("remat", "plain")]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
