"""Entry points print a user error (bad flag, config, file, workdir) as one line on stderr and exit with status
2, ``--verbose`` adding the traceback; programming errors keep theirs. ``bigen_jax.evaluate`` creates nothing
when the workdir, its checkpoints or the asked step are missing."""

import os
import re
import subprocess
import sys

import pytest

from bigen_jax import errors
from bigen_jax import evaluate
from bigen_jax import tasks
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab
from configs import demo
from conftest import write_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = '''
from absl import flags
from bigen_jax import cli
from bigen_jax import errors

_KIND = flags.DEFINE_string("kind", "user", "Which error main raises.")


def main(argv):
  if _KIND.value == "user":
    raise errors.ConfigError("--config.x=3 cannot work:\\n  use 2")
  raise RuntimeError("a bug")


if __name__ == "__main__":
  cli.run(main)
'''


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES=""))


def _error_line(proc: subprocess.CompletedProcess, *fragments: str, verbose: bool = False) -> str:
  """The one ``error:`` line, last on stderr, after checking the exit status and the (absent) traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert ("Traceback (most recent call last)" in proc.stderr) == verbose, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and proc.stderr.rstrip().splitlines()[-1] == lines[0], proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def test_run_user_errors_one_line_programming_errors_traceback(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(_SCRIPT)
  assert _error_line(_run(str(script))) == "error: --config.x=3 cannot work: use 2"
  _error_line(_run(str(script), "--verbose"), "--config.x=3 cannot work: use 2", verbose=True)
  _error_line(_run(str(script), "--bogus"), "bogus")
  bug = _run(str(script), "--kind=bug")
  assert bug.returncode == 1 and "Traceback (most recent call last)" in bug.stderr, bug.stderr
  assert bug.stderr.rstrip().endswith("RuntimeError: a bug") and "error:" not in bug.stderr


def test_config_flag_errors_name_the_flag():
  main = ("-m", "bigen_jax.main", "--workdir", "unused")
  _error_line(_run(*main, "--config", "configs/demo.py:foo"), "--config=configs/demo.py:foo",
              "expected 'demo', 'tiny', 'two_stage' or 'stage2'")
  typo = ("--config", "configs/demo.py:tiny", "--config.optimizer.lrr=1")
  _error_line(_run(*main, *typo), "--config.optimizer.lrr=1", 'Did you mean "lr" instead of "lrr"?')
  _error_line(_run(*main, *typo, "--verbose"), "--config.optimizer.lrr=1", verbose=True)
  _error_line(_run(*main, "--config", "configs/no_such.py"), "--config=configs/no_such.py", "No such file")


def test_tools_and_main_print_user_errors_as_one_line(tmp_path):
  missing = str(tmp_path / "no_records")
  _error_line(_run(os.path.join("tools", "build_vocab.py"), f"--records={missing}", f"--out={tmp_path / 'v'}"),
              f"no manifest.json in {missing}")
  _error_line(_run(os.path.join("tools", "extract_features.py"), "--source=nope"), "--source")
  workdir = str(tmp_path / "run")
  _error_line(_run("-m", "bigen_jax.main", "--config", "configs/demo.py:tiny", "--workdir", workdir,
                   f"--config.data.records_dir={missing}", "--verbose"), f"no manifest.json in {missing}",
              verbose=True)
  assert not os.path.exists(workdir)


def test_unknown_task_is_a_config_error():
  with pytest.raises(errors.ConfigError, match=r"unknown task 'i2tt' in config.tasks: known tasks are"):
    tasks.get_task("i2tt")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("eval_errors"))
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  write_records(records_dir, splits={"train": 16, "validation": 8}, dim=8, max_len=6)
  vocab.build_vocab(records_dir, vocab_dir, k=4, iterations=2, sample_size=500, seed=0)
  vocab_txt = os.path.join(root, "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(200)]) + "\n")
  config = demo.get_config("tiny")
  config.data.update(dict(records_dir=records_dir, vocab_dir=vocab_dir, tokenizer=vocab_txt))
  config.mesh.num_devices = 1
  return config


def test_evaluate_missing_workdir_checkpoints_or_step_creates_nothing(tmp_path, config):
  missing = str(tmp_path / "typo")
  with pytest.raises(errors.UserError, match=re.escape(f"--workdir={missing} does not exist")):
    evaluate.evaluate(config, missing, evaluators=["validation_loss"])
  assert not os.path.exists(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(errors.UserError, match=re.escape(f"no checkpoints in {empty / 'checkpoints'}")):
    evaluate.evaluate(config, str(empty), evaluators=["validation_loss"])
  assert os.listdir(empty) == []
  run = tmp_path / "run"
  for name in ("12", "16", "20", "24.orbax-checkpoint-tmp-1700000000"):
    (run / "checkpoints" / name).mkdir(parents=True)
  for step in (7, -1):
    with pytest.raises(errors.UserError, match=re.escape(
        f"no checkpoint step {step} in {run / 'checkpoints'}: available steps are [12, 16, 20]")):
      evaluate.evaluate(config, str(run), step=step, evaluators=["validation_loss"])
  assert sorted(os.listdir(run)) == ["checkpoints"]
  _error_line(_run("-m", "bigen_jax.evaluate", "--config", "configs/demo.py:tiny", "--workdir", missing),
              f"--workdir={missing} does not exist")
  assert not os.path.exists(missing)
