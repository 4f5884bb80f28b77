"""``scripts/benchmarks/run_all.py``: one table of the benchmarks' ratios, each equal to what its script wrote
with ``--json``; a failing benchmark is an error row and exit status 1, the others still run."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ALL = os.path.join(ROOT, "scripts", "benchmarks", "run_all.py")
sys.path.insert(0, os.path.dirname(RUN_ALL))

import timing  # pylint: disable=g-import-not-at-top  # noqa: E402


def test_result_ratio_is_above_one_when_ours_is_better():
  assert timing.result(ours=2.0, peer=6.0, unit="s", lower_is_better=True) == {
      "ours": 2.0, "peer": 6.0, "ratio": 3.0, "unit": "s"}
  assert timing.result(ours=6.0, peer=2.0, unit="steps/s")["ratio"] == 3.0
  assert timing.result(ours=6.0, peer=None, unit="steps/s")["ratio"] is None


def _run_all(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, RUN_ALL, "--quick", "--timeout", "120", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


def _table(text: str) -> dict[str, list[str]]:
  """benchmark -> its cells (command, ours, peer, ratio, wall) in a markdown table."""
  rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
  return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.fixture(scope="module")
def cheap_run(tmp_path_factory):
  """run_all on the two cheapest benchmarks (quick: ~1 s and ~8 s), pinned to core 0."""
  out = tmp_path_factory.mktemp("bench")
  done = _run_all("--only", "cider,clip", "--cores", "0", "--out", str(out))
  return done, out


def test_table_rows_are_the_benchmarks_results(cheap_run):
  done, out = cheap_run
  assert done.returncode == 0, done.stderr
  with open(out / "benchmarks.json") as f:
    summary = json.load(f)
  with open(out / "benchmarks.md") as f:
    markdown = f.read()
  assert markdown == done.stdout
  assert "taskset -c 0" in markdown.splitlines()[0] and summary["cores"] == "0" and summary["quick"]
  table, rows = _table(markdown), {r["benchmark"]: r for r in summary["rows"]}
  printed = {"cider": (r"wall: pycocoevalcap Cider ([\d.]+) s +CiderD ([\d.]+) s", "{peer:.3f} {ours:.4f}"),
             "clip": (r"images +([\d.]+) +([\d.]+)", "{ours:.1f} {peer:.1f}")}
  for name, script, sub in (("cider", "bench_cider.py", "cpu"), ("clip", "bench_clip.py", "texts")):
    with open(out / f"{name}.json") as f:
      wrote = json.load(f)
    with open(out / f"{name}.log") as f:
      pattern, numbers = printed[name]
      assert " ".join(re.search(pattern, f.read()).groups()) == numbers.format(**wrote), wrote  # JSON = stdout
    for row, result in ((name, wrote), (f"{name} ({sub})", wrote[sub])):
      assert isinstance(result["ratio"], float) and result["ratio"] > 0, result
      faster = result["peer"] / result["ours"] if result["unit"] == "s" else result["ours"] / result["peer"]
      assert result["ratio"] == pytest.approx(faster, rel=1e-12), result
      assert rows[row]["ratio"] == result["ratio"] and rows[row]["ours"] == result["ours"], (rows[row], result)
      assert rows[row]["error"] is None
      assert table[row][3] == f"{result['ratio']:.2f}x", table[row]
    assert table[name][0] == f"`{rows[name]['command']}`"
    assert rows[name]["command"].startswith(f"taskset -c 0 python scripts/benchmarks/{script} --")
    assert rows[name]["wall_s"] > 0 and table[name][4].endswith(" s")


def test_failing_benchmark_is_an_error_row(tmp_path):
  done = _run_all("--only", "model,cider", "--extra", "model=--no_such_flag", "--out", str(tmp_path))
  assert done.returncode == 1, done.stderr
  table = _table(done.stdout)
  assert "no_such_flag" in table["model"][1] and table["model"][1].startswith("**failed**"), table["model"]
  assert "--no_such_flag" in table["model"][0]
  with open(tmp_path / "cider.json") as f:
    assert table["cider"][3] == f"{json.load(f)['ratio']:.2f}x"
  with open(tmp_path / "benchmarks.json") as f:
    rows = {r["benchmark"]: r for r in json.load(f)["rows"]}
  assert "Unknown command line flag 'no_such_flag'" in rows["model"]["error"] and rows["model"]["ratio"] is None
  assert rows["cider"]["error"] is None


def test_unknown_benchmark_is_a_usage_error():
  done = _run_all("--only", "cider,nope")
  assert done.returncode == 1 and "unknown benchmarks ['nope']" in done.stderr, done.stderr


def test_budget_cuts_the_running_benchmark_and_skips_the_rest(tmp_path):
  done = _run_all("--only", "cider,clip", "--budget", "0.5", "--out", str(tmp_path))
  assert done.returncode == 1, done.stderr
  with open(tmp_path / "benchmarks.json") as f:
    rows = {r["benchmark"]: r for r in json.load(f)["rows"]}
  assert rows["cider"]["error"].startswith("timed out after 0.") and rows["cider"]["wall_s"] < 5, rows["cider"]
  assert rows["clip"]["error"] == "skipped: the --budget of 0.5 s was spent" and rows["clip"]["wall_s"] is None
  assert rows["clip"]["command"].startswith("python scripts/benchmarks/bench_clip.py --config tiny")
  assert "skipped" in _table(done.stdout)["clip"][1]


def test_captions_benchmark_decodes_the_same_captions_as_pytorch(tmp_path):
  """bench_captions.py (quick: tiny config, 2 images) through run_all: a ratio, and JAX's greedy captions equal the
  PyTorch loop's on the same (converted) weights."""
  done = _run_all("--only", "captions_small", "--out", str(tmp_path))
  assert done.returncode == 0, done.stderr
  with open(tmp_path / "captions_small.json") as f:
    wrote = json.load(f)
  assert wrote["unit"] == "captions/s" and wrote["ours"] > 0 and wrote["peer"] > 0, wrote
  assert wrote["captions_equal"] == 1.0, wrote
  assert _table(done.stdout)["captions_small"][3] == f"{wrote['ratio']:.2f}x"
