"""Every third-party module that jkd or its tests import belongs to a declared dependency.

The import walk reads the source (``ast``) of ``jkd/`` and ``tests/``, so a function-level import
counts too. Each top-level module outside the standard library is mapped to its distribution
(``importlib.metadata.packages_distributions``), which must be declared in ``pyproject.toml``:
the library core (``jkd.losses``, ``jkd.models``, ``jkd.sampling``) in ``dependencies``, the rest
of ``jkd/`` there or in the ``train`` extra, the tests there or in ``test``, the benchmarks and
``scripts/`` there or in ``bench`` (or, for a benchmark that uses it only when it is installed,
in :data:`OPTIONAL_BENCH_MODULES`). A package that jkd reaches through a feature of another
library (jinja2 for transformers' chat templates) cannot be found by reading imports:
:data:`FEATURE_DEPENDENCIES` names them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Core packages of jkd: importable with ``pip install jkd`` alone.
CORE_PATHS = ("jkd/__init__.py", "jkd/precision.py", "jkd/runtime.py", "jkd/losses",
              "jkd/models", "jkd/sampling")

#: Distributions that jkd needs through another library's feature, never by importing them.
FEATURE_DEPENDENCIES = {
    "jinja2": ("train", "transformers' tokenizer.apply_chat_template (jkd.data.corpus)"),
}

#: Modules a benchmark uses only when they happen to be installed (imported under
#: ``try/except ImportError``, reported as skipped otherwise), declared by no extra.
OPTIONAL_BENCH_MODULES = {
    "liger_kernel": "bench/device_check.py measures Liger-Kernel's fused linear JSD beside jkd's"
                    " where it installs (a CUDA GPU; bench/device_check.sh tries, best effort)",
}

#: Modules the core must not import (they come with the ``train`` extra, or are slow to load).
TRAIN_ONLY_MODULES = ("transformers", "tokenizers", "tensorflow_datasets", "grain", "orbax",
                      "optax", "ml_collections", "matplotlib", "tensorboardX", "jinja2", "tqdm")


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
  return _canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def declared() -> dict[str, set[str]]:
  """``{"core": {...}, "train": {...}, "test": {...}}``: canonical distribution names."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  groups = {"core": {_requirement_name(r) for r in project["dependencies"]}}
  for extra, requirements in project.get("optional-dependencies", {}).items():
    groups[extra] = {_requirement_name(r) for r in requirements}
  return groups


def _python_files(path: str):
  full = os.path.join(ROOT, path)
  if os.path.isfile(full):
    yield full
    return
  for folder, _, files in os.walk(full):
    yield from (os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))


def imported_modules(paths, local=(), *, module_level_only=False) -> dict[str, list[str]]:
  """Top-level third-party modules imported by the files under ``paths`` -> importing files.

  ``module_level_only``: only the imports at the top of each module, not inside functions.
  """
  skip = set(sys.stdlib_module_names) | {"__future__", "jkd"} | set(local)
  found: dict[str, list[str]] = {}
  for path in paths:
    for file in _python_files(path):
      with open(file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=file)
      for node in (tree.body if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
          names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
          names = [node.module]
        else:
          continue
        for name in names:
          top = name.split(".")[0]
          if top not in skip:
            found.setdefault(top, []).append(os.path.relpath(file, ROOT))
  return found


def undeclared(modules: dict[str, list[str]], allowed: set[str]) -> list[str]:
  """One line per module whose distribution is not in ``allowed``."""
  distributions = importlib.metadata.packages_distributions()
  problems = []
  for module, files in sorted(modules.items()):
    owners = {_canonical(d) for d in distributions.get(module, ())}
    if not owners:
      problems.append(f"{module} (imported by {files[0]}) is not installed: declare the"
                      " distribution that provides it in pyproject.toml")
    elif not owners & allowed:
      problems.append(f"{module} (imported by {files[0]}) comes from {sorted(owners)}, which"
                      f" pyproject.toml does not declare where it is needed")
  return problems


def test_walk_finds_function_level_imports():
  # The walk must see imports inside functions (jkd imports transformers lazily) and skip the
  # standard library and jkd itself.
  modules = imported_modules(["jkd/models/gguf_io.py"])
  assert {"numpy", "gguf", "tokenizers", "transformers"} <= set(modules)
  assert not {"os", "re", "jkd", "__future__"} & set(modules)


def test_undeclared_reports_a_missing_distribution():
  groups = declared()
  modules = {"numpy": ["x.py"], "jax": ["x.py"], "no_such_module_jkd": ["y.py"]}
  problems = undeclared(modules, groups["core"] - {"numpy"})
  assert len(problems) == 2
  assert problems[0].startswith("no_such_module_jkd (imported by y.py) is not installed")
  assert problems[1].startswith("numpy (imported by x.py) comes from ['numpy']")


def test_core_imports_only_core_dependencies():
  groups = declared()
  assert {"jax", "flax", "numpy"} <= groups["core"]
  assert not {"transformers", "tensorflow-datasets", "grain", "orbax-checkpoint"} & groups["core"]
  assert undeclared(imported_modules(CORE_PATHS), groups["core"] | groups["train"]) == []
  # At module level the core imports core dependencies only; the train-extra ones it may use
  # (transformers for tokenizers) are imported inside the functions that need them.
  top_level = imported_modules(CORE_PATHS, module_level_only=True)
  assert {"jax", "numpy", "flax"} <= set(top_level)
  assert undeclared(top_level, groups["core"]) == []


def test_jkd_imports_are_declared():
  groups = declared()
  assert undeclared(imported_modules(["jkd"]), groups["core"] | groups["train"] | groups["eval"]
                    ) == []
  # The eval extra is imported at module level by jkd.harness alone (an lm_eval model class),
  # elsewhere inside the functions that use it: the main job runs without the extra.
  top_level = imported_modules(["jkd"], module_level_only=True)
  outside = {m: [f for f in files if not f.endswith("harness.py")]
             for m, files in top_level.items()}
  assert undeclared({m: f for m, f in outside.items() if f}, groups["core"] | groups["train"]
                    ) == []


def test_test_imports_are_declared():
  groups = declared()
  local = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "tests"))}
  modules = imported_modules(["tests"], local=local)
  assert "pytest" in modules
  assert "jkd[train,eval]" in {r.replace(" ", "") for r in _raw_extra("test")}
  assert undeclared(modules, groups["core"] | groups["train"] | groups["eval"] | groups["test"]
                    ) == []


def test_bench_and_script_imports_are_declared():
  # Benchmarks and the golden-file script may use PyTorch: the bench extra declares it.
  groups = declared()
  local = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "bench"))}
  modules = imported_modules(["bench", "scripts"], local=local)
  assert "torch" in modules
  allowed = groups["core"] | groups["train"] | groups["eval"] | groups["bench"]
  distributions = importlib.metadata.packages_distributions()
  if "torch" not in distributions:  # torch is not installed by the test extra
    assert "torch" in groups["bench"]
    modules.pop("torch")
  for module in OPTIONAL_BENCH_MODULES:
    assert all(f.startswith("bench/") for f in modules.pop(module, [])), module
  assert undeclared(modules, allowed) == []


def _raw_extra(extra: str) -> list[str]:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["optional-dependencies"][extra]


@pytest.mark.parametrize("distribution", sorted(FEATURE_DEPENDENCIES))
def test_feature_dependencies_are_declared_and_installed(distribution):
  extra, why = FEATURE_DEPENDENCIES[distribution]
  assert distribution in declared()[extra], f"declare {distribution} in [{extra}]: {why}"
  importlib.metadata.version(distribution)  # raises PackageNotFoundError when missing


def test_every_declared_distribution_is_installed():
  # The suite runs in the environment that pyproject.toml describes (CI makes a fresh one).
  groups = declared()
  missing = []
  for name in sorted(groups["core"] | groups["train"] | groups["eval"] | groups["test"]):
    if name == "jkd":
      continue
    try:
      importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      missing.append(name)
  assert missing == []


_CORE_ONLY = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

    sys.meta_path.insert(0, Block())
    import jax, jax.numpy as jnp, numpy as np
    import jkd.losses as L
    import jkd.models as M
    import jkd.sampling as S

    logits = jnp.array(np.random.default_rng(0).normal(size=(2, 5, 11)), jnp.float32)
    labels = jnp.array([[1, 2, 3, 4, -100], [5, 6, 7, -100, -100]])
    ce = L.masked_mean(L.cross_entropy(logits, labels), L.label_mask(labels))
    kd = L.forward_kl(logits, logits[::-1]).mean()
    config = M.ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, max_position_embeddings=32)
    params = M.init_params(config, jax.random.key(0))
    out = S.generate(params, [[1, 2, 3]], config=config, key=None, max_new_tokens=3,
                     greedy=True)
    try:
      M.load_tokenizer("missing.gguf")
    except ImportError as e:
      message = str(e)
    else:
      raise AssertionError("load_tokenizer without transformers must raise ImportError")
    loaded = sorted(m for m in BLOCKED if m in sys.modules)
    print(float(ce), float(kd), out.tokens.shape, loaded, message, sep="\\n")
""")


def test_core_works_without_the_train_extra():
  # The core install (jax, flax, numpy, gguf, safetensors) simulated by blocking every module of
  # the train extra: losses, a model and the sampler run, and none of those modules is loaded.
  result = subprocess.run([sys.executable, "-c", _CORE_ONLY, ",".join(TRAIN_ONLY_MODULES)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  ce, kd, shape, loaded, message = result.stdout.strip().splitlines()[-5:]
  assert float(ce) > 0 and float(kd) > 0
  assert shape == "(1, 3)"
  assert loaded == "[]"
  assert message == ("load_tokenizer needs the 'transformers' package, which the core install of"
                     " jkd does not include: pip install 'jkd[train]'")
