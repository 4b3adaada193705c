"""bench/device_check.sh --dry-run: the GPU check's every part, on the CPU at tiny shapes.

On a GPU machine ``bash bench/device_check.sh`` writes ``bench/results/gpu_*.md``; here (CI, no
GPU, no PyTorch in the test environment) the same code runs at tiny shapes, and each file must
name the device, say that the GPU figures are still to come, and hold a figure for its part or
the reason it was skipped.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"


def load_driver():
  spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check")
  env = dict(os.environ, PYTHON=sys.executable)
  proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return {part: (out / f"gpu_{part}.md").read_text() for part in load_driver().PARTS}


def test_every_part_names_the_device_and_the_figures_to_come(dry_run):
  assert sorted(dry_run) == ["fused_loss", "sampler", "tests", "train_step"]
  for text in dry_run.values():
    assert "- device: `cpu` (JAX backend `cpu`" in text
    assert "**dry run**" in text and "The GPU figures are still to come" in text
    assert "did not finish" not in text


def test_the_test_subset_passed(dry_run):
  passed = re.search(r"^(\d+) passed, 0 failed, 0 skipped of (\d+) tests", dry_run["tests"], re.M)
  assert passed and int(passed.group(1)) == int(passed.group(2)) >= 4
  assert "| tests/test_backend_paths.py |" in dry_run["tests"]


def test_fused_loss_figures_beside_liger(dry_run):
  text = dry_run["fused_loss"]
  number = r"\d+\.\d+"
  for form in ("fused", "unfused"):
    assert re.search(rf"^\| jkd {form} \| {number} MB \| {number} MB \| {number} MB \| - \|"
                     rf" {number} \|$", text, re.M), text
  assert "| liger fused linear JSD, published (H100) | - | - | - | 11.10 GB | 60.7 |" in text
  assert "| plain PyTorch (logits materialised), published (H100) | - | - | - | 68.90 GB |" \
         " 213.0 |" in text
  assert "Liger measured in this run: skipped: dry run" in text


def torch_installed() -> bool:
  return importlib.util.find_spec("torch") is not None


def test_train_step_figures(dry_run):
  text = dry_run["train_step"]
  for name in ("jkd", "jkd fused"):
    assert re.search(rf"^\| {name} \| \d+\.\d+ \| \d+ \| unknown card \| \d+\.\d+% \|$", text,
                     re.M), text
  assert "unknown card `cpu` (no datasheet peak)" in text
  if torch_installed():
    assert re.search(r"^\| pytorch \| \d+\.\d+ \|", text, re.M), text
  else:
    assert "PyTorch: skipped: torch is not installed" in text


def test_sampler_figures_at_batch_1_and_32(dry_run):
  text = dry_run["sampler"]
  for batch in (1, 32):
    row = re.search(rf"^\| {batch} \| (\d+\.\d+) \| (.*)$", dry_run["sampler"], re.M)
    assert row and float(row.group(1)) > 0, text
    assert ("skipped" not in row.group(2)) == torch_installed()
  if not torch_installed():
    assert "transformers: skipped: torch is not installed" in text


def test_dry_run_results_never_go_to_the_committed_folder():
  driver = load_driver()
  out = driver.default_out(dry_run=True)
  try:
    assert not os.listdir(out) and not out.startswith(str(ROOT))
  finally:
    os.rmdir(out)
  assert os.path.realpath(driver.default_out(dry_run=False)) == str(ROOT / "bench" / "results")


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12),
                                        ("cpu", None), ("Tesla T4", None)])
def test_dense_bf16_peak_by_card_name(name, peak):
  assert load_driver().dense_bf16_peak(name) == peak


def test_usage_errors():
  proc = subprocess.run(["bash", str(SCRIPT), "--budget", "soon"], capture_output=True,
                        text=True, timeout=30, check=False)
  assert proc.returncode == 2 and "usage: bash bench/device_check.sh" in proc.stderr
  proc = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True,
                        timeout=30, check=False)
  assert proc.returncode == 2 and "unknown argument '--gpu'" in proc.stderr
