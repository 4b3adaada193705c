"""jkd.students: importance scores against a float64 NumPy reference, pruning, ranking, errors."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import models
from jkd import students
from jkd.models import ModelConfig
from test_models import _params, _rms, _rope, _silu

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
            num_kv_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)


def _batch(seed=0, b=2, t=9, vocab=50, hidden_prefix=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t))
  labels = np.concatenate([tokens[:, 1:], np.full((b, 1), -100)], 1)
  labels[:, :hidden_prefix] = -100  # A prompt: feeds the activations, is not scored.
  return {"tokens": tokens.astype(np.int32), "labels": labels.astype(np.int32)}


def numpy_scores(params, cfg, batches):
  """The module docstring's scores, written from their definitions in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  lay, nh, nkv, d, n = p["layers"], cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, \
      cfg.num_layers
  sums = dict(nll=0.0, count=0, influence=np.zeros(n), heads=np.zeros((n, nh)),
              mlp=np.zeros((n, cfg.intermediate_size)), embed=np.zeros(cfg.hidden_size))
  removal_nll = np.zeros(n)

  def forward(tokens, labels, skip=None):
    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)
    w = (labels >= 0).astype(np.float64)
    x = p["embed"]["embedding"][tokens]
    for i in range(n):
      if i == skip:
        continue
      x_in = x
      h = _rms(x, lay["attn_norm"]["scale"][i], cfg.rms_norm_eps)
      q = _rope(np.einsum("th,hnd->tnd", h, lay["attn"]["q"]["kernel"][i]), pos, cfg.rope_theta)
      k = _rope(np.einsum("th,hnd->tnd", h, lay["attn"]["k"]["kernel"][i]), pos, cfg.rope_theta)
      v = np.einsum("th,hnd->tnd", h, lay["attn"]["v"]["kernel"][i])
      contrib = np.zeros((t, nh, cfg.hidden_size))
      for head in range(nh):
        kh = head // (nh // nkv)
        s = q[:, head] @ k[:, kh].T / math.sqrt(d)
        s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        contrib[:, head] = (a @ v[:, kh]) @ lay["attn"]["o"]["kernel"][i][head]
      x = x + contrib.sum(1)
      h2 = _rms(x, lay["mlp_norm"]["scale"][i], cfg.rms_norm_eps)
      act = _silu(h2 @ lay["mlp"]["gate"]["kernel"][i]) * (h2 @ lay["mlp"]["up"]["kernel"][i])
      x = x + act @ lay["mlp"]["down"]["kernel"][i]
      if skip is None:
        cos = np.sum(x_in * x, -1) / (np.linalg.norm(x_in, axis=-1) * np.linalg.norm(x, axis=-1))
        sums["influence"][i] += np.sum((1 - cos) * w)
        sums["heads"][i] += np.sum(np.linalg.norm(contrib, axis=-1) * w[:, None], 0)
        sums["mlp"][i] += np.sum(np.abs(act) * w[:, None], 0) * np.linalg.norm(
            lay["mlp"]["down"]["kernel"][i], axis=-1)
        sums["embed"] += np.sum((np.abs(h) + np.abs(h2)) * w[:, None], 0)
    x = _rms(x, p["final_norm"]["scale"], cfg.rms_norm_eps)
    if skip is None:
      sums["embed"] += np.sum(np.abs(x) * w[:, None], 0)
    logits = x @ p["embed"]["embedding"].T
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.sum(np.where(labels >= 0, logp[np.arange(t), np.maximum(labels, 0)], 0.0))

  for b in batches:
    for tokens, labels in zip(b["tokens"], b["labels"]):
      sums["nll"] += forward(tokens, labels)
      sums["count"] += int(np.sum(labels >= 0))
      for i in range(n):
        removal_nll[i] += forward(tokens, labels, skip=i)
  c = sums["count"]
  return dict(nll=sums["nll"] / c, removal=removal_nll / c, influence=sums["influence"] / c,
              heads=sums["heads"] / c, mlp=sums["mlp"] / c,
              embed=sums["embed"] / (c * (2 * n + 1)))


def test_measure_matches_numpy():
  cfg = ModelConfig(**TINY)
  params = _params(cfg)
  batches = [_batch(0), _batch(1)]
  got = students.measure(params, cfg, batches)
  ref = numpy_scores(params, cfg, batches)
  assert got.tokens == sum(int(np.sum(b["labels"] >= 0)) for b in batches)
  np.testing.assert_allclose(got.nll, ref["nll"], rtol=1e-4)
  for name in ("removal", "influence", "heads", "mlp", "embed"):
    np.testing.assert_allclose(getattr(got, name), ref[name], rtol=2e-4, atol=1e-6,
                               err_msg=name)


def _logits(params, cfg, tokens):
  return np.asarray(models.apply(params, jnp.asarray(tokens), config=cfg).logits)


def test_pruning_dead_parts_keeps_the_function():
  """A head with a zero output slice, MLP channels with zero ``down`` rows and a layer whose
  outputs are zero score 0; pruning exactly them leaves the logits unchanged."""
  cfg = ModelConfig(**TINY)
  params = jax.tree.map(np.array, _params(cfg))
  lay = params["layers"]
  dead_head = {0: 1, 1: 2, 2: 0, 3: 3}  # Per layer, one query head of one KV group.
  for layer, head in dead_head.items():
    lay["attn"]["o"]["kernel"][layer, head] = 0.0
  dead_mlp = np.arange(0, 48, 4)  # 12 of 48 channels in every layer.
  lay["mlp"]["down"]["kernel"][:, dead_mlp] = 0.0
  lay["attn"]["o"]["kernel"][2] = 0.0  # Layer 2 is the identity.
  lay["mlp"]["down"]["kernel"][2] = 0.0
  batch = _batch(3)
  imp = students.measure(params, cfg, [batch])
  assert np.all(imp.mlp[:, dead_mlp] == 0) and imp.influence[2] == pytest.approx(0, abs=1e-6)
  assert imp.removal[2] == pytest.approx(imp.nll, rel=1e-5)
  assert students.layer_order(imp, "influence")[0] == 2
  # Drop the identity layer, 12 dead channels and one query head per KV group in layers 0-1-3.
  # (Layer 2's heads are all dead: its kept heads are any, and it is removed anyway.)
  s_cfg, s_params = students.prune(params, cfg, imp, num_layers=3, intermediate_size=36,
                                   num_heads=4, layers_by="influence")
  want = _logits(params, cfg, batch["tokens"])
  np.testing.assert_allclose(_logits(s_params, s_cfg, batch["tokens"]), want, atol=2e-5)
  s_cfg, s_params = students.prune(params, cfg, imp, num_layers=3, layers_by="influence")
  np.testing.assert_allclose(_logits(s_params, s_cfg, batch["tokens"]), want, atol=2e-5)
  # Heads: each layer (0, 1, 3 kept) loses its dead head: 3 of 4 heads is not a multiple of 2
  # KV heads, so the test kills a second head in the other group and keeps 2.
  for layer, head in {0: 3, 1: 0, 3: 1}.items():
    lay["attn"]["o"]["kernel"][layer, head] = 0.0
  imp = students.measure(params, cfg, [batch])
  s_cfg, s_params = students.prune(params, cfg, imp, num_layers=3, num_heads=2,
                                   intermediate_size=36, layers_by="influence")
  assert (s_cfg.num_layers, s_cfg.num_heads, s_cfg.num_kv_heads, s_cfg.dim_per_head,
          s_cfg.intermediate_size) == (3, 2, 2, 8, 36)
  np.testing.assert_allclose(_logits(s_params, s_cfg, batch["tokens"]),
                             _logits(params, cfg, batch["tokens"]), atol=2e-5)


def test_prune_keeps_the_best_parts_in_order():
  cfg = ModelConfig(**TINY)
  params = _params(cfg)
  imp = students.measure(params, cfg, [_batch(0)])
  imp = imp._replace(removal=np.array([5.0, 1.0, 3.0, 4.0]),
                     embed=np.arange(32, dtype=float)[::-1].copy())
  s_cfg, s_params = students.prune(params, cfg, imp, num_layers=2, hidden_size=20)
  assert (s_cfg.num_layers, s_cfg.hidden_size, s_cfg.dim_per_head) == (2, 20, 8)
  keep = np.array([0, 3])  # The two layers whose removal costs most.
  np.testing.assert_array_equal(s_params["layers"]["mlp"]["up"]["kernel"],
                                np.asarray(params["layers"]["mlp"]["up"]["kernel"])[keep][:, :20])
  np.testing.assert_array_equal(s_params["embed"]["embedding"],
                                np.asarray(params["embed"]["embedding"])[:, :20])
  np.testing.assert_array_equal(s_params["layers"]["attn"]["o"]["kernel"],
                                np.asarray(params["layers"]["attn"]["o"]["kernel"])[keep][..., :20])
  out = models.apply(s_params, jnp.asarray(_batch(0)["tokens"]), config=s_cfg)
  assert out.logits.shape == (2, 9, 50) and np.all(np.isfinite(out.logits))
  assert jax.tree.map(jnp.shape, s_params) == jax.tree.map(
      jnp.shape, models.init_params(s_cfg, jax.random.key(0)))


@pytest.mark.parametrize("extra", [{}, {"tie_embeddings": False, "qkv_bias": True},
                                   {"qk_norm": True, "head_dim": 16}])
def test_count_params_counts_every_parameter(extra):
  cfg = ModelConfig(**TINY, **extra)
  params = models.init_params(cfg, jax.random.key(0))
  total = sum(x.size for x in jax.tree.leaves(params))
  counted = students.count_params(cfg)
  assert counted["total"] == total
  assert counted["embedding"] == 50 * 32 * (1 if cfg.tie_embeddings else 2)


def test_rank_candidates_table():
  cfg = ModelConfig(**TINY)
  params = _params(cfg)
  imp = students.measure(params, cfg, [_batch(0)])
  cands = [students.Candidate("depth 2", num_layers=2),
           students.Candidate("mlp 24", intermediate_size=24),
           students.Candidate("all", num_layers=4)]
  rows = students.rank_candidates(params, cfg, imp, [_batch(1)], candidates=cands, budget=0.8)
  assert [r["fits"] for r in rows] == [True, True, False]  # The full teacher is over budget.
  assert rows[0]["kl"] <= rows[1]["kl"]
  assert rows[2]["kl"] == pytest.approx(0, abs=1e-5) and rows[2]["top1"] == 1.0
  # NLL and top-1 of a candidate against a NumPy computation from its logits.
  s_cfg, s_params = students.prune(params, cfg, imp, num_layers=2)
  b = _batch(1)
  logits = _logits(s_params, s_cfg, b["tokens"]).astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  m = b["labels"] >= 0
  nll = -np.take_along_axis(logp, np.maximum(b["labels"], 0)[..., None], -1)[..., 0][m].mean()
  depth = next(r for r in rows if r["name"] == "depth 2")
  assert depth["nll"] == pytest.approx(nll, rel=1e-4)
  text = students.table(rows, cfg)
  assert "| 1 | " in text and "| - | all |" in text and "teacher" in text


def test_default_candidates_fit_the_budget():
  cfg = ModelConfig()  # SmolLM2-135M's shape.
  full = students.count_params(cfg)["non_embedding"]
  cands = students.default_candidates(cfg, 0.6)
  assert len(cands) >= 5
  for c in cands:
    share = students.count_params(students.shape(cfg, c))["non_embedding"] / full
    assert 0.45 < share <= 0.6, (c, share)


def test_bad_input_errors():
  cfg = ModelConfig(**TINY)
  params = _params(cfg)
  imp = students.measure(params, cfg, [_batch(0)], removal=False)
  with pytest.raises(ValueError, match=r"num_layers=0 must be an int in \[1, 4\]"):
    students.prune(params, cfg, imp, num_layers=0)
  with pytest.raises(ValueError, match="multiple of 2"):
    students.prune(params, cfg, imp, num_heads=3)
  with pytest.raises(ValueError, match=r"intermediate_size=96 .*teacher's 48"):
    students.prune(params, cfg, imp, intermediate_size=96)
  with pytest.raises(ValueError, match="no removal scores"):
    students.prune(params, cfg, imp, num_layers=2)
  with pytest.raises(ValueError, match="another model"):
    students.prune(params, cfg.replace(intermediate_size=40), imp, intermediate_size=20)
  with pytest.raises(ValueError, match="outside the teacher's vocabulary of 50"):
    students.measure(params, cfg, [_batch(0, vocab=60) | {"tokens": np.full((2, 9), 55)}])
  with pytest.raises(ValueError, match="no scored token"):
    students.measure(params, cfg, [])
  empty = _batch(0)
  empty["labels"][:] = -100
  with pytest.raises(ValueError, match="no scored token"):
    students.measure(params, cfg, [empty])
  with pytest.raises(ValueError, match="budget"):
    students.rank_candidates(params, cfg, imp, [_batch(1)], budget=0.0)


RANDOM_TEACHER = ('random:{"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,'
                  ' "num_layers": 4, "num_heads": 4, "num_kv_heads": 2}')


def _jsonl(path, n=6):
  rows = [{"prompt": f"Name a colour number {i}.", "completion": f"Blue is colour {i}, calm."}
          for i in range(n)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_command_line_prints_the_ranked_table(tmp_path, capsys):
  out_json = tmp_path / "table.json"
  rows = students.main(["--teacher", RANDOM_TEACHER, "--calibration", _jsonl(tmp_path / "c.jsonl"),
                        "--budget", "0.8", "--batches", "1", "--batch-size", "3",
                        "--seq-len", "48", "--candidate", "layers=2", "--candidate",
                        "layers=3,mlp=32", "--json", str(out_json)])
  text = capsys.readouterr().out
  assert [r["name"] for r in rows] == sorted([r["name"] for r in rows],
                                             key=lambda n: next(r["kl"] for r in rows
                                                                if r["name"] == n))
  assert "| 1 | " in text and "layers=2" in text and "layers from least to most" in text
  saved = json.loads(out_json.read_text())
  assert len(saved["importance"]["removal"]) == 4 and len(saved["rows"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--candidate", "layers=9"], r"num_layers=9 must be an int in \[1, 4\]"),
    (["--candidate", "depth=2"], r"bad candidate 'depth=2'"),
    (["--budget", "0"], r"--budget must be in \(0, 1\]"),
    (["--calibration", "EMPTY"], r"gave no calibration example"),
])
def test_command_line_errors(tmp_path, capsys, args, message):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  args = [str(empty) if a == "EMPTY" else a for a in args]
  if "--calibration" not in args:
    args += ["--calibration", _jsonl(tmp_path / "c.jsonl")]
  with pytest.raises(SystemExit) as e:
    students.main(["--teacher", RANDOM_TEACHER, "--batches", "1", "--seq-len", "48", *args])
  assert e.value.code == 2
  assert re.search(message, capsys.readouterr().err)


SHARDED_SCRIPT = """
import json
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import test_students as t
from jkd import students
from jkd.models import ModelConfig, param_axes
from test_models import _params

assert jax.device_count() == 8, jax.devices()
cfg = ModelConfig(**t.TINY)
params = _params(cfg)
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
rules = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor"}
specs = jax.tree.map(lambda s: PartitionSpec(*(rules.get(a) for a in s)), param_axes(cfg),
                     is_leaf=lambda s: isinstance(s, PartitionSpec))
sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                         is_leaf=lambda s: isinstance(s, PartitionSpec)))
assert len(sharded["layers"]["mlp"]["up"]["kernel"].sharding.device_set) == 8
batches = [t._batch(0, b=4), t._batch(1, b=4)]
one, many = (students.measure(p, cfg, batches) for p in (params, sharded))
diff = {k: float(np.max(np.abs(np.asarray(getattr(one, k)) - np.asarray(getattr(many, k)))))
        for k in ("removal", "influence", "heads", "mlp", "embed")}
sizes = dict(num_layers=3, intermediate_size=40, num_heads=2)
_, p1 = students.prune(params, cfg, one, **sizes)
_, p8 = students.prune(sharded, cfg, many, **sizes)
diff["pruned"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
print(json.dumps(diff))
"""


def test_sharded_teacher_gives_the_unsharded_scores():
  import os  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [str(root / "tests"), str(root), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  diff = json.loads(proc.stdout.strip().splitlines()[-1])
  assert all(v < 2e-5 for v in diff.values()), diff
