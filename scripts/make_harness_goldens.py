"""Regenerates tests/data/harness_golden.json: the harness's own Hugging Face model on a jkd export.

tests/test_harness.py checks jkd's lm-eval adapter (jkd.harness.JkdLM) against this file without
PyTorch. The reference is lm-eval's ``HFLM`` (transformers' ``LlamaForCausalLM``, float32, one
request at a time, so no padding) on the tiny student that the test builds
(``tests/test_harness.py``: ``student_params``, SmolLM2's tokenizer), exported with jkd's
``save_hf``. Rerun after changing the student or the requests, then commit the output:

  pip install 'lm-eval[hf]'   # plus torch (CPU is enough), in a venv that also has jkd[test]
  PYTHONPATH=. python scripts/make_harness_goldens.py

It writes the student's recipe and the library versions, then:

* ``loglikelihood``: ``(context, continuation)`` pairs from jkd's prompt set (an empty context,
  a context ending in a space, contexts longer than ``max_length``, and continuations that are
  the model's own greedy text) with HFLM's log-likelihood and ``is_greedy``;
* ``loglikelihood_rolling``: documents of one to several windows with HFLM's log-likelihood
  and the number of windows;
* ``generate_until``: contexts and generation kwargs (stop strings, some of them inside a
  token or across tokens of what the model writes, ``max_gen_toks``) with HFLM's text;
* ``greedy_tokens``: transformers' ``generate`` (greedy, no stop token) on two prompts; every
  step's top-2 logit margin is checked to be far above float32 noise, so the tokens are a
  platform-independent reference.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np
import torch
import transformers
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "tests", "data", "harness_golden.json")
PROMPTS = os.path.join(ROOT, "jkd", "data", "prompts", "instructions.jsonl")
#: Most new tokens of the greedy-token check; the smallest top-2 margin it accepts.
GREEDY_STEPS, MIN_MARGIN = 24, 1e-2


def _test_module():
  spec = importlib.util.spec_from_file_location("test_harness",
                                                os.path.join(ROOT, "tests", "test_harness.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _requests(kind: str, args: list) -> list[Instance]:
  return [Instance(request_type=kind, doc={}, arguments=tuple(a), idx=i)
          for i, a in enumerate(args)]


def _prompts() -> list[dict]:
  with open(PROMPTS) as f:
    return [json.loads(line) for line in f]


def main() -> None:
  th = _test_module()
  rows = _prompts()
  by_domain = {}
  for r in rows:
    by_domain.setdefault(r["domain"], []).append(r)
  with tempfile.TemporaryDirectory() as directory:
    th.export_student(directory)
    lm = HFLM(pretrained=directory, batch_size=1, max_length=th.MAX_LENGTH, dtype="float32",
              device="cpu")
    tokenizer = lm.tokenizer

    # generate_until: two groups of generation kwargs, batches of 4 (few compilations in the
    # test). A random model writes no "\n", so group A runs to max_gen_toks (or EOS); its texts
    # are scored as continuations below (is_greedy). Group B's stop strings are 3 characters
    # from the middle of what the model writes uncut, inside one token or across two.
    long_context = " ".join(r["prompt"] for r in by_domain["facts"][:6])  # > max_length tokens
    group_a = {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
    gen_cases = [(f"Instruction: {by_domain[d][i]['prompt']}\nDomain:", group_a)
                 for i, d in enumerate(sorted(by_domain))]
    gen_cases += [(long_context, group_a), (by_domain["code"][0]["prompt"], group_a)]
    b_contexts = [f"Question: {by_domain[d][1]['prompt']}\nAnswer:" for d in sorted(by_domain)[:4]]
    free = lm.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 16})
                                                          for c in b_contexts]))
    group_b = {"until": ["@@"] + [t[len(t) // 2:len(t) // 2 + 3] for t in free],
               "max_gen_toks": 16}
    gen_cases += [(c, group_b) for c in b_contexts]
    gen_texts = lm.generate_until(_requests("generate_until", gen_cases))
    cut = sum(len(t) < len(f) for t, f in zip(gen_texts[-len(free):], free))
    if cut != len(free):
      raise SystemExit(f"only {cut} of {len(free)} generations were cut at a stop string.")

    # loglikelihood
    ll_cases = []
    for domain in sorted(by_domain):
      prompt = by_domain[domain][0]["prompt"]
      ll_cases.append((f"Instruction: {prompt}\nDomain:", f" {domain}"))
      ll_cases.append((f"Instruction: {prompt}\nDomain: ", "writing"))  # trailing space moves
    ll_cases.append(("", by_domain["facts"][1]["prompt"]))  # empty context: BOS
    ll_cases.append((long_context, " The end."))  # truncated on the left
    ll_cases.append(("Summary:", " " + " ".join(r["prompt"] for r in by_domain["writing"][:2])))
    for (context, _), text in zip(gen_cases[:3], gen_texts[:3]):
      ll_cases.append((context, text))  # the greedy continuation: is_greedy (if it re-encodes)
    ll = lm.loglikelihood(_requests("loglikelihood", ll_cases))

    # loglikelihood_rolling
    docs = [by_domain["everyday"][0]["prompt"],
            " ".join(r["prompt"] for r in by_domain["reasoning"][:4]),
            " ".join(r["prompt"] for r in by_domain["writing"][:9]),
            "\n".join(r["prompt"] for r in by_domain["code"][:2])]
    rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in docs]))
    windows = [len(list(lm_utils.get_rolling_token_windows(
        lm.tok_encode(d), lm.prefix_token_id, th.MAX_LENGTH, 1))) for d in docs]

    # greedy tokens straight from transformers
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = [tokenizer.encode(by_domain["facts"][0]["prompt"]),
               tokenizer.encode("Domain:")]
    greedy = []
    for ids in prompts:
      out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, do_sample=False,
                           eos_token_id=None, pad_token_id=0, output_scores=True,
                           return_dict_in_generate=True)
      scores = torch.stack(out.scores)[:, 0]
      top2 = torch.topk(scores, 2, dim=-1).values
      margin = float((top2[:, 0] - top2[:, 1]).min())
      if margin < MIN_MARGIN:
        raise SystemExit(f"greedy top-2 margin {margin} < {MIN_MARGIN}: a near tie; change the"
                         " prompt or the student's seed.")
      greedy.append(out.sequences[0, len(ids):].tolist())

  golden = {
      "student": {"config": th.STUDENT, "seed": th.STUDENT_SEED, "max_length": th.MAX_LENGTH},
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "lm_eval": importlib.metadata.version("lm_eval"),
                   "numpy": np.__version__},
      "loglikelihood": [{"context": c, "continuation": x, "logprob": lp, "is_greedy": g}
                        for (c, x), (lp, g) in zip(ll_cases, ll)],
      "loglikelihood_rolling": [{"text": d, "logprob": lp, "windows": w}
                                for d, lp, w in zip(docs, rolling, windows)],
      "generate_until": [{"context": c, "gen_kwargs": k, "text": t}
                         for (c, k), t in zip(gen_cases, gen_texts)],
      "greedy_tokens": {"prompts": prompts, "tokens": greedy},
  }
  with open(OUT, "w") as f:
    json.dump(golden, f, indent=1)
    f.write("\n")
  print(f"wrote {OUT}: {len(ll)} loglikelihood, {len(rolling)} rolling (windows {windows}),"
        f" {len(gen_texts)} generations, is_greedy {[g for _, g in ll]}")


if __name__ == "__main__":
  main()
