"""The main job's path end to end (configs/demo.py:tiny): corpus, training, report, resume."""

import json
import os

import pytest

from jkd import students
from jkd.data import store
from jkd.models import ModelConfig
from jkd.train import build
from jkd.train import sources, stages
from jkd.train.writer import read_metrics
from recipe_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg):
  return load_config("demo", arg)


def test_default_demo_config_is_the_smollm2_job():
  c = _config(None)
  assert c.teacher.source == "smollm2" and c.student.source == "prune"
  # The student: at most 60% of the teacher's non-embedding parameters (SmolLM2's shape is
  # ModelConfig's default).
  teacher = ModelConfig()
  student = build.student_config(c, teacher)
  share = (students.count_params(student)["non_embedding"]
           / students.count_params(teacher)["non_embedding"])
  assert (student.num_layers, student.intermediate_size) == (24, 960) and share <= 0.6
  assert c.data.source == "teacher_corpus" and c.report.enabled
  assert c.objective.kd.term == "forward_kl"
  with pytest.raises(ValueError, match="unknown variant"):
    _config("nope")


def test_split_prompts_holds_out_every_tenth_id():
  records = stages_records = [{"id": f"w{i:03d}"} for i in range(1, 31)]
  train, held = sources.corpus.split_prompts(stages_records, 10)
  assert [r["id"] for r in held] == ["w010", "w020", "w030"]
  assert len(train) == 27 and len(records) == 30
  with pytest.raises(ValueError, match="holdout_every"):
    sources.corpus.split_prompts(records, 1)


def test_tiny_demo_end_to_end_and_resume(tmp_path):
  cfg = _config("tiny")
  result = stages.run(cfg, str(tmp_path))
  assert result["status"] == "done" and result["step"] == cfg.train.steps
  # The corpora: one record per prompt, teacher-written completions, held-out golden text.
  train = store.open_split(str(tmp_path / "data" / "corpus_train"), "train")
  held = store.open_split(str(tmp_path / "data" / "corpus_eval"), "train")
  golden = store.open_split(str(tmp_path / "data" / "golden"), "train")
  assert len(train) == cfg.corpus.limit and len(held) == len(golden) == 2
  assert all(int("".join(filter(str.isdigit, held[i]["id"].decode()))) % 10 == 0
             for i in range(len(held)))
  # Metrics: the initial student at step 0, then evaluations with golden metrics.
  history = read_metrics(str(tmp_path))
  evals = [r for r in history if "eval/kl_forward" in r]
  assert [r["step"] for r in evals] == [0, 2, 4]
  assert all("golden/student_nll" in r for r in evals)
  facts = json.load(open(result["report"]["json"]))
  assert facts["before"]["step"] == 0 and facts["after"]["step"] == 4
  assert len(facts["samples"]) == 2
  assert set(facts["samples"][0]) == {"prompt", "teacher", "student before", "student after"}
  assert os.path.getsize(result["report"]["png"]) > 1000
  # Running again on the finished workdir reuses the corpus and trains no further.
  mtime = os.path.getmtime(tmp_path / "data" / "corpus_train" / "1.0.0" / "dataset_info.json")
  again = stages.run(cfg, str(tmp_path))
  assert again["step"] == cfg.train.steps
  assert os.path.getmtime(
      tmp_path / "data" / "corpus_train" / "1.0.0" / "dataset_info.json") == mtime
  assert len(read_metrics(str(tmp_path))) == len(history)


def test_teacher_corpus_source_outside_stages_is_a_clear_error(tmp_path):
  from jkd.train import train
  with pytest.raises(ValueError, match="stages.run"):
    train(_config("tiny"), str(tmp_path))
