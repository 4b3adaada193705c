"""jkd/data/prompts/instructions.jsonl: the shipped instruction prompt set (issue 6).

Checks the file itself: schema, ids, per-domain counts, lengths, no duplicates and no
near-duplicates (word-set Jaccard similarity), and that the README describes what is shipped.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

import jkd.data

PROMPTS_DIR = pathlib.Path(jkd.data.__file__).parent / "prompts"
PROMPTS_FILE = PROMPTS_DIR / "instructions.jsonl"

DOMAINS = {  # domain -> (id letter, count)
    "writing": ("w", 60),
    "reasoning": ("r", 60),
    "code": ("c", 60),
    "facts": ("f", 60),
    "everyday": ("e", 40),
    "summarise_rewrite": ("s", 40),
}
ID_RE = re.compile(r"^([a-z])(\d{3})$")
WORD_RE = re.compile(r"[a-z0-9']+")
MAX_JACCARD = 0.8


def load_rows(path=PROMPTS_FILE):
  """Parses the JSONL file; a bad line raises ValueError naming file and line."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        raise ValueError(f"{path}:{lineno}: blank line; remove it")
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
      if not isinstance(row, dict) or set(row) != {"id", "prompt", "domain"}:
        raise ValueError(f"{path}:{lineno}: want an object with keys id, prompt, domain; "
                         f"got {row!r}")
      if not all(isinstance(v, str) for v in row.values()):
        raise ValueError(f"{path}:{lineno}: id, prompt and domain must be strings")
      rows.append(row)
  return rows


def word_set(text):
  return frozenset(WORD_RE.findall(text.lower()))


def jaccard_matrix(texts):
  """[n, n] word-set Jaccard similarities, from one incidence-matrix product."""
  sets = [word_set(t) for t in texts]
  vocab = {w: i for i, w in enumerate(sorted(set().union(*sets)))}
  incidence = np.zeros((len(sets), len(vocab)), np.float32)
  for row, words in enumerate(sets):
    incidence[row, [vocab[w] for w in words]] = 1.0
  inter = incidence @ incidence.T  # exact: small integer counts in float32
  sizes = incidence.sum(axis=1)
  union = sizes[:, None] + sizes[None, :] - inter
  return inter / np.maximum(union, 1.0)


@pytest.fixture(scope="module")
def rows():
  return load_rows()


def test_file_parses_into_320_rows(rows):
  assert len(rows) == 320


def test_ids_are_unique_well_formed_and_numbered_per_domain(rows):
  ids = [r["id"] for r in rows]
  assert len(set(ids)) == len(ids)
  numbers = {d: [] for d in DOMAINS}
  for r in rows:
    m = ID_RE.match(r["id"])
    assert m, f"malformed id {r['id']!r}"
    assert r["domain"] in DOMAINS, f"{r['id']}: unknown domain {r['domain']!r}"
    assert m.group(1) == DOMAINS[r["domain"]][0], f"{r['id']}: letter does not match {r['domain']}"
    numbers[r["domain"]].append(int(m.group(2)))
  for domain, (_, count) in DOMAINS.items():
    assert numbers[domain] == list(range(1, count + 1)), domain


def test_every_domain_has_its_count(rows):
  counts = {d: 0 for d in DOMAINS}
  for r in rows:
    counts[r["domain"]] += 1
  assert counts == {d: n for d, (_, n) in DOMAINS.items()}


def test_prompts_are_printable_ascii_without_stray_whitespace(rows):
  for r in rows:
    p = r["prompt"]
    assert p == p.strip() and "  " not in p, r["id"]
    assert all(32 <= ord(ch) < 127 for ch in p), f"{r['id']}: non-ASCII or control character"


def test_no_exact_duplicate_prompts(rows):
  normalised = [" ".join(r["prompt"].lower().split()) for r in rows]
  assert len(set(normalised)) == len(normalised)


def test_prompt_lengths_between_3_and_120_words(rows):
  lengths = np.array([len(r["prompt"].split()) for r in rows])
  bad = [(r["id"], n) for r, n in zip(rows, lengths) if not 3 <= n <= 120]
  assert not bad
  # "Short to medium": most prompts within 8..40 words.
  assert np.mean((lengths >= 8) & (lengths <= 40)) >= 0.85


def test_jaccard_matrix_against_python_sets():
  texts = ["Write a poem about rain.", "Write a poem about the rain!", "Sort a list in Python.",
           "What is 2 + 2?"]
  got = jaccard_matrix(texts)
  sets = [word_set(t) for t in texts]
  want = np.array([[len(a & b) / len(a | b) for b in sets] for a in sets])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0, 1] == pytest.approx(5 / 6)  # {write a poem about rain} + {the}
  assert got[0, 1] > MAX_JACCARD > got[0, 2]


def test_no_near_duplicates_by_word_jaccard(rows):
  sim = jaccard_matrix([r["prompt"] for r in rows])
  np.fill_diagonal(sim, 0.0)
  i, j = np.nonzero(np.triu(sim > MAX_JACCARD))
  pairs = [(rows[a]["id"], rows[b]["id"], float(sim[a, b])) for a, b in zip(i, j)]
  assert not pairs, f"near-duplicate prompts (Jaccard > {MAX_JACCARD}): {pairs}"


def test_summarise_rewrite_prompts_carry_their_text(rows):
  for r in rows:
    if r["domain"] == "summarise_rewrite":
      assert re.search(r'"[^"]{10,}"', r["prompt"]), f"{r['id']}: no quoted text to work on"


def test_eval_holdout_covers_every_domain(rows):
  held = [r for r in rows if int(r["id"][1:]) % 10 == 0]
  assert len(held) == 32
  assert {r["domain"] for r in held} == set(DOMAINS)


def test_readme_states_the_counts_and_the_holdout():
  readme = " ".join((PROMPTS_DIR / "README.md").read_text(encoding="utf-8").split())
  for domain, (letter, count) in DOMAINS.items():
    assert re.search(rf"`{domain}`\s*\|\s*`{letter}`\s*\|\s*{count}\b", readme), domain
  assert "Apache-2.0" in readme
  assert "divisible by 10" in readme


def test_bad_line_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"id": "w001", "prompt": "Write a poem.", "domain": "writing"}\n{"id": 3}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: want an object"):
    load_rows(path)
