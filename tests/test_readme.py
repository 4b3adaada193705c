"""The README's Python examples run as written (they are the documentation users copy)."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) >= 7, "the README lost its examples"
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
  # Spot-check what the examples computed.
  assert namespace["per_token"].shape == (2, 8)
  assert np.isfinite(float(namespace["loss"])) and float(namespace["loss"]) > 0
  assert float(namespace["total"]) == float(namespace["metrics"]["loss/total"])
  assert jnp.all(jnp.isfinite(namespace["grads"][1]))
