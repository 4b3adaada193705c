"""The Python examples of the documentation pages run as written (they are what users copy);
each page's examples run in order, in one namespace per page. The README's relative links
point to existing files."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ("docs/losses.md", "docs/models.md", "docs/engine.md", "docs/students.md")


def run_examples(page):
  path = ROOT / page
  blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
  namespace = {}
  for block in blocks:
    exec(compile(block, str(path), "exec"), namespace)  # noqa: S102
  return blocks, namespace


@pytest.mark.parametrize("page", PAGES)
def test_doc_examples_run(page):
  blocks, namespace = run_examples(page)
  assert blocks, f"{page} lost its examples"
  if page == "docs/losses.md":
    assert len(blocks) >= 7, "docs/losses.md lost its examples"
    assert namespace["per_token"].shape == (2, 8)
    assert np.isfinite(float(namespace["loss"])) and float(namespace["loss"]) > 0
    assert float(namespace["total"]) == float(namespace["metrics"]["loss/total"])
    assert jnp.all(jnp.isfinite(namespace["grads"][1]))
  if page == "docs/students.md":
    assert namespace["student_cfg"].num_layers == 3 and namespace["student"]["layers"]["mlp"][
        "up"]["kernel"].shape == (3, 32, 48)


@pytest.mark.parametrize("page", ["README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(page):
  path = ROOT / page
  links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
  local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
  missing = [link for link in local if not (path.parent / link).exists()]
  assert missing == []
