"""jkd.harness: jkd models on EleutherAI's lm-evaluation-harness, without PyTorch.

* Parity: a tiny Llama student (SmolLM2's 49152-token vocabulary, width 16) built from a NumPy
  generator, exported with ``save_hf`` and loaded through the adapter (``model=hf:DIR``), scores
  and generates as the harness's own Hugging Face model (``HFLM``, PyTorch) does on the same
  export: ``tests/data/harness_golden.json``, written by ``scripts/make_harness_goldens.py``
  (which builds the student with :func:`student_params` below).
* A local harness task set made from jkd's shipped prompts (multiple choice, generation, rolling
  log-likelihood) runs end to end through ``lm_eval.simple_evaluate`` and the ``python -m
  jkd.harness`` command line, the latter with PyTorch made unimportable.
* Bad model arguments and generation options are ValueErrors that say what to pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from jkd import models, sampling
from jkd.harness import JkdLM, score_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "harness_golden.json")
PROMPTS = os.path.join(ROOT, "jkd", "data", "prompts", "instructions.jsonl")

#: The exported student: SmolLM2's vocabulary and tokenizer, a tiny body.
STUDENT = dict(architecture="llama", vocab_size=49152, hidden_size=16, intermediate_size=32,
               num_layers=2, num_heads=2, num_kv_heads=1, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_embeddings=True)
STUDENT_SEED = 20250611
#: The harness's max_length in the parity tests: short, so truncation and several rolling
#: windows are exercised.
MAX_LENGTH = 64
#: Log-likelihood tolerance (float32 sums of up to 64 terms of about -10).
ATOL, RTOL = 1e-4, 1e-5


def student_config() -> models.ModelConfig:
  return models.ModelConfig(**STUDENT)


def student_params(config: models.ModelConfig, seed: int = STUDENT_SEED) -> dict:
  """Parameters drawn from ``np.random.default_rng(seed)`` (the same without torch or JAX's
  RNG): embeddings N(0, 1) and kernels N(0, 0.3^2), so that the next-token distributions are
  peaked and the greedy choices are far from ties; norm scales 1 + N(0, 0.1^2). Leaves are drawn
  in the order of ``jax.tree_util`` (sorted keys)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    std = 1.0 if "embedding" in name else 0.3
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def export_student(directory: str) -> None:
  """The student, with the SmolLM2 tokenizer, as a Hugging Face directory (``save_hf``)."""
  config = student_config()
  tokenizer = models.load_tokenizer(models.smollm2_gguf_path())
  models.save_hf(directory, student_params(config), config, tokenizer=tokenizer)


def requests(kind: str, args: list) -> list[Instance]:
  return [Instance(request_type=kind, doc={}, arguments=tuple(a), idx=i)
          for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def golden() -> dict:
  with open(GOLDEN) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("harness") / "student")
  export_student(directory)
  return directory


@pytest.fixture(scope="module")
def lm(student_dir) -> JkdLM:
  return JkdLM(model=f"hf:{student_dir}", batch_size=4, max_length=MAX_LENGTH)


# -------------------------------------------------------------------------------------------------
# Parity with the harness's Hugging Face model (PyTorch) on the exported student


def test_golden_recipe_is_this_student(golden):
  assert golden["student"] == {"config": STUDENT, "seed": STUDENT_SEED,
                               "max_length": MAX_LENGTH}
  # The cases mean something: greedy and non-greedy continuations, truncated inputs, documents
  # of several windows, generations cut at a stop string and at max_gen_toks.
  flags = [r["is_greedy"] for r in golden["loglikelihood"]]
  assert any(flags) and not all(flags)
  assert max(r["windows"] for r in golden["loglikelihood_rolling"]) >= 3


def test_loglikelihood_matches_hf(lm, golden):
  cases = golden["loglikelihood"]
  got = lm.loglikelihood(requests("loglikelihood", [(c["context"], c["continuation"])
                                                    for c in cases]), disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [c["logprob"] for c in cases], atol=ATOL,
                             rtol=RTOL)
  assert [g[1] for g in got] == [c["is_greedy"] for c in cases]


def test_loglikelihood_rolling_matches_hf(lm, golden):
  cases = golden["loglikelihood_rolling"]
  got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(c["text"],) for c in cases]),
                                 disable_tqdm=True)
  np.testing.assert_allclose(got, [c["logprob"] for c in cases], atol=ATOL, rtol=RTOL)


def test_generate_until_matches_hf(lm, golden):
  cases = golden["generate_until"]
  got = lm.generate_until(requests("generate_until", [(c["context"], c["gen_kwargs"])
                                                      for c in cases]), disable_tqdm=True)
  assert got == [c["text"] for c in cases]


def test_greedy_tokens_match_transformers(lm, golden):
  # jkd's sampler on the loaded export against transformers' generate (no stop token).
  case = golden["greedy_tokens"]
  out = sampling.generate(lm.params, case["prompts"], config=lm.config, key=None, greedy=True,
                          max_new_tokens=len(case["tokens"][0]))
  assert np.asarray(out.tokens).tolist() == case["tokens"]


def test_scores_do_not_depend_on_batching_and_reuse_compilations(lm, golden):
  cases = [(c["context"], c["continuation"]) for c in golden["loglikelihood"]]
  together = lm.loglikelihood(requests("loglikelihood", cases), disable_tqdm=True)
  compiled = score_tokens._cache_size()  # pylint: disable=protected-access
  alone = [lm.loglikelihood(requests("loglikelihood", [c]), disable_tqdm=True)[0]
           for c in cases[:3]]
  np.testing.assert_allclose([a[0] for a in alone], [t[0] for t in together[:3]], atol=1e-5)
  again = lm.loglikelihood(requests("loglikelihood", cases[::-1]), disable_tqdm=True)
  np.testing.assert_allclose([a[0] for a in again[::-1]], [t[0] for t in together], atol=1e-5)
  # Shapes are bucketed: one batch size and at most a few lengths per call, not one per request.
  assert score_tokens._cache_size() <= compiled + 2  # pylint: disable=protected-access


# -------------------------------------------------------------------------------------------------
# A local task set end to end

DOMAINS = ["writing", "reasoning", "code", "facts", "everyday", "summarise_rewrite"]


def write_tasks(directory) -> tuple[list[str], list[dict]]:
  """Three harness tasks on 2 prompts per domain of jkd's prompt set: the domain as a multiple
  choice, generated, and the prompts' perplexity. Returns the task names and the documents."""
  with open(PROMPTS) as f:
    rows = [json.loads(line) for line in f]
  docs = [next(r for r in rows if r["domain"] == d and r["id"].endswith(n))
          for d in DOMAINS for n in ("001", "002")]
  data = directory / "domains.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  common = {"dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(data)},
                               "cache_dir": str(directory / "datasets_cache")},
            "doc_to_text": "Instruction: {{prompt}}\nDomain:"}
  tasks = {
      "jkd_domain_mc": dict(common, output_type="multiple_choice", doc_to_choice=DOMAINS,
                            doc_to_target="{{domain}}",
                            metric_list=[{"metric": "acc"}]),
      "jkd_domain_gen": dict(common, output_type="generate_until", doc_to_target=" {{domain}}",
                             generation_kwargs={"until": ["\n"], "max_gen_toks": 16,
                                                "do_sample": False},
                             metric_list=[{"metric": "exact_match"}]),
      "jkd_prompt_ppl": dict(common, output_type="loglikelihood_rolling",
                             doc_to_text="", doc_to_target="{{prompt}}",
                             metric_list=[{"metric": "word_perplexity"},
                                          {"metric": "bits_per_byte"}]),
  }
  for name, config in tasks.items():
    # JSON is YAML: the harness reads these as task configs.
    (directory / f"{name}.yaml").write_text(json.dumps(dict(config, task=name), indent=1))
  return list(tasks), docs


def test_simple_evaluate_local_tasks(lm, tmp_path):
  names, docs = write_tasks(tmp_path)
  out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tmp_path)),
                        bootstrap_iters=0, log_samples=False, verbosity="ERROR")
  results = out["results"]
  assert set(names) <= set(results)
  # The harness's accuracy is the argmax of the adapter's own scores of the six answers.
  contexts = [f"Instruction: {d['prompt']}\nDomain:" for d in docs]
  scores = lm.loglikelihood(requests("loglikelihood", [(c, " " + a) for c in contexts
                                                       for a in DOMAINS]), disable_tqdm=True)
  picked = np.argmax(np.reshape([s[0] for s in scores], (len(docs), len(DOMAINS))), axis=1)
  expected = np.mean(picked == [DOMAINS.index(d["domain"]) for d in docs])
  assert results["jkd_domain_mc"]["acc,none"] == pytest.approx(expected)
  assert 0.0 <= results["jkd_domain_gen"]["exact_match,none"] <= 1.0
  assert np.isfinite(results["jkd_prompt_ppl"]["word_perplexity,none"])
  assert results["jkd_prompt_ppl"]["bits_per_byte,none"] > 0


_CLI = """
import importlib.machinery, sys

# PyTorch as if not installed, even where it is: the path finder does not see it (importing it
# fails, importlib.util.find_spec finds nothing, as lm-eval and transformers check).
_find = importlib.machinery.PathFinder.find_spec
importlib.machinery.PathFinder.find_spec = classmethod(
    lambda cls, name, path=None, target=None:
    None if name.split(".")[0] == "torch" else _find(name, path, target))
from jkd.harness import main
main()
assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
print("no torch")
"""


def test_command_line_without_torch(student_dir, tmp_path):
  write_tasks(tmp_path)
  out = tmp_path / "results"
  result = subprocess.run(
      [sys.executable, "-c", _CLI, "run", "--model", "jkd", "--model_args",
       f"model=hf:{student_dir},max_length={MAX_LENGTH}", "--tasks", "jkd_domain_mc",
       "--include_path", str(tmp_path), "--limit", "2", "--batch_size", "16",
       "--output_path", str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("no torch")
  assert "jkd_domain_mc" in result.stdout
  saved = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files
           if f.startswith("results")]
  assert saved and "jkd_domain_mc" in json.load(open(saved[0]))["results"]


# -------------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("args, match", [
    ({}, "needs model=SPEC"),
    ({"model": "nope:/x"}, "unknown model spec 'nope:/x'"),
    ({"model": "smollm2", "batch_size": 0}, "batch_size must be an int >= 1"),
    ({"model": "smollm2", "batch_size": "auto"}, "automatic batch sizes are not supported"),
    ({"model": "smollm2", "batch_size": 2.5}, "batch_size must be an int >= 1"),
    ({"model": "smollm2", "dtype": "float16"}, "dtype must be 'float32' or 'bfloat16'"),
    ({"model": "smollm2", "pretrained": "gpt2"}, r"unknown model_args \['pretrained'\]"),
])
def test_bad_model_args(args, match):
  with pytest.raises(ValueError, match=match):
    JkdLM(**args)


def test_bad_model_args_from_the_harness(student_dir):
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    JkdLM.create_from_arg_string(f"model=hf:{student_dir},batch_size=-1")
  with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
    JkdLM.create_from_arg_string(f"model=hf:{student_dir},max_length=4096")
  with pytest.raises(FileNotFoundError):
    JkdLM.create_from_arg_string(f"model=hf:{student_dir}/missing")


def test_bad_requests(lm):
  with pytest.raises(ValueError, match="request 0 has an empty continuation"):
    lm.loglikelihood(requests("loglikelihood", [("Hi", "")]), disable_tqdm=True)
  with pytest.raises(ValueError, match="more than max_length"):
    lm.loglikelihood(requests("loglikelihood", [("Hi", " word" * (MAX_LENGTH + 1))]),
                     disable_tqdm=True)


def test_bad_generation_options(lm):
  with pytest.raises(ValueError, match=r"generation options \['num_beams'\] are not supported"):
    lm.generate_until(requests("generate_until", [("Hi", {"until": ["\n"], "num_beams": 4})]))
  with pytest.raises(ValueError, match="must be less than max_length"):
    lm.generate_until(requests("generate_until", [("Hi", {"max_gen_toks": MAX_LENGTH})]))
