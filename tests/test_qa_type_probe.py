"""``scripts/qa_type_probe.py`` on tiny records with questions: it trains on the chosen question types only, its
loss falls, and an unknown type is a usage error naming the vocabulary's types."""

import os
import re
import subprocess
import sys

from bigen_jax import experiment
from bigen_jax import run_config
from configs import xlxmert_vqa
from conftest import qa_fixture
from conftest import write_training_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "qa_type_probe.py")
TRAIN, VALIDATION = 24, 11


def _qa_run(root: str) -> str:
  """A QA run directory (its saved config only) over records with ``conftest.qa_fixture``'s questions."""
  data = write_training_data(root, splits={"train": TRAIN, "validation": VALIDATION}, questions=True, words=300)
  config = xlxmert_vqa.get_config("tiny")
  config.update_from_flattened_dict({f"data.{k}": v for k, v in data.items()})
  workdir = os.path.join(root, "qa_run")
  run_config.save(experiment.build_context(config, workdir).config, workdir)
  return workdir


def _probe(workdir: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, SCRIPT, "--workdir", workdir, *args], capture_output=True, text=True,
                        timeout=600, check=False)


def test_trains_on_the_chosen_types_and_its_loss_falls(tmp_path):
  workdir = _qa_run(str(tmp_path))
  chosen = ["number", "yes/no"]
  run = _probe(workdir, "--types", ",".join(chosen), "--steps", "40", "--batch_size", "8", "--lr", "3e-3")
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  counts = [sum(sum(t in chosen for _, _, t, _ in qa_fixture(i)) for i in range(n)) for n in (TRAIN, VALIDATION)]
  assert f"{counts[0]} training and {counts[1]} validation questions" in run.stdout
  steps = re.findall(r"step (\d+) training loss ([0-9.]+) validation accuracy [0-9.]+ \{(.*)\}", run.stdout)
  assert [int(s) for s, _, _ in steps] == [1, 8, 16, 24, 32, 40]
  assert all(re.findall(r"'([^']+)':", types) == chosen for _, _, types in steps)
  assert float(steps[-1][1]) < 0.85 * float(steps[0][1])  # the mean loss over all those training questions


def test_an_unknown_type_names_the_vocabulary_types(tmp_path):
  run = _probe(_qa_run(str(tmp_path)), "--types", "number,colour_of", "--steps", "2")
  assert run.returncode != 0
  assert "--types ['colour_of']" in run.stderr and "'number'" in run.stderr
