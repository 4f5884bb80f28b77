"""The results report: tables beside the paper's, images that resolve, notes for missing parts, atomic rewrites,
the command line and (where Chromium and Playwright are installed) the page as a browser draws it."""

import html.parser
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from bigen_jax import errors, paper, report

CHROMIUM = "/usr/bin/chromium"
STAGE1 = {"captioning/CIDEr-D": 2.0725, "captioning/BLEU-4": 0.6010, "captioning/semantic/accuracy": 0.72,
          "generation/fid_recognizer": 6.0979, "generation/clip_score": 11.7342,
          "generation/guidance/semantic/accuracy": 0.312, "captioning/semantic/relations_precision": float("nan")}
STAGE2 = {"captioning/CIDEr-D": 2.1543, "captioning/BLEU-4": 0.5890, "generation/fid_recognizer": 9.9301}
SUMMARY = {"dataset sizes (train/validation/test)": "2000/250/250", "time: 1 world": "20.1s (0.97 cores busy)",
           "time: 10 stage 2": "105.7s (1.57 cores busy)", "time: 7 train": "393.5s (1.72 cores busy)",
           "time: 9c generator": "106.0s (1.74 cores busy)", "time: total": "625.3s"}


def _png(path, width, height, colour):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((height, width, 3), colour, np.uint8)).save(path)


def _json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def make_demo_out(root, *, full=True):
  """A finished demo's files, small: summary.json always; with ``full`` two evaluated runs with their grids and
  captions, metrics.jsonl histories, the caption sheet and an ablation table."""
  _json(os.path.join(root, "summary.json"), SUMMARY)
  if not full:
    return str(root)
  for run, step, results, colour in (("train", 800, STAGE1, (200, 30, 30)), ("stage2", 100, STAGE2, (30, 30, 200))):
    _json(os.path.join(root, run, "eval", f"results_{step}.json"), results)
    _json(os.path.join(root, run, "eval", f"captions_{step}.json"),
          {"7": {"caption": f"a red circle ({run})", "references": ["one red circle"]}})
    _png(os.path.join(root, run, "eval", f"generation_{step}.png"), 48, 32, colour)
    _png(os.path.join(root, run, "eval", f"reconstructions_{step}.png"), 24, 32, (90, 90, 90))
  rows = [{"step": s, "i2t/loss": 5.0 / s, "i2t/accuracy": 0.1 * np.log(s), "lr": 1e-3} for s in (1, 50, 100)]
  rows.insert(2, {"step": 50, "validation_loss/i2t/loss": 2.5, "validation_loss/i2t/shuffled_loss": 3.0})
  with open(os.path.join(root, "train", "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 150, "i2t/lo')  # a half-written last line
  with open(os.path.join(root, "stage2", "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "scst/reward_greedy": 1.8, "clip/cos": float("nan")}) + "\n")
  _png(os.path.join(root, "captions.png"), 40, 30, (30, 160, 30))
  _json(os.path.join(root, "ablations", "ablations_validation.json"),
        [{"row": "full", "minutes": 4.4, **STAGE2}, {"row": "no_clip_loss", "minutes": 4.3, **STAGE1}])
  return str(root)


class _Page(html.parser.HTMLParser):
  """The tables (rows of cell texts), <img> sources, headings and notes of a page."""

  def __init__(self, text):
    super().__init__()
    self.tables, self.images, self.notes, self.headings, self._cell, self._where = [], [], [], [], None, []
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "table":
      self.tables.append([])
    elif tag == "tr":
      self.tables[-1].append([])
    elif tag in ("td", "th"):
      self._cell = ""
    elif tag == "img":
      self.images.append(attrs["src"])
    self._where.append((tag, attrs.get("class")))

  def handle_endtag(self, tag):
    if tag in ("td", "th"):
      self.tables[-1][-1].append(self._cell.strip())
      self._cell = None
    if self._where:
      self._where.pop()

  def handle_data(self, data):
    if self._cell is not None:
      self._cell += data
    elif self._where and self._where[-1] == ("p", "note"):
      self.notes.append(data)
    elif self._where and self._where[-1][0] == "h2":
      self.headings.append(data)


def _table_with(page, first_cell):
  """The table holding a row that starts with ``first_cell``, as {first cell: row}, and its header."""
  for table in page.tables:
    rows = {row[0]: row for row in table[1:] if row}
    if first_cell in rows:
      return table[0], rows
  raise AssertionError(f"no table has a row {first_cell!r}: {page.tables}")


def _read_page(path):
  with open(path) as f:
    return _Page(f.read())


def test_report_holds_the_tables_beside_the_papers(tmp_path):
  path = report.write_report(make_demo_out(tmp_path / "demo"))
  assert path == str(tmp_path / "demo" / "report" / "index.html")
  page = _read_page(path)
  header, rows = _table_with(page, "CIDEr-D")
  assert header[-2:] == ["stage 1 (step 800)", "stage 2 (step 100)"]
  assert rows["CIDEr-D"][header.index("paper: Ours")] == "122.6"
  assert rows["CIDEr-D"][header.index("paper: X-LXMERT")] == "41.0"
  assert rows["CIDEr-D"][-2:] == ["2.072", "2.154"]
  assert rows["FID"][-2:] == ["6.098", "9.930"] and rows["FID"][header.index("paper: Ours")] == "29.9"
  assert rows["captions true of the scene"][-2:] == ["0.720", "–"]  # stage 2 has no such figure
  header, rows = _table_with(page, "no_clip_loss")
  assert rows["full"][header.index("CIDEr-D")] == "2.154" and rows["full"][-1] == paper.TABLE1["full"]
  assert rows["no_clip_loss"][header.index("guided semantic acc.")] == "0.312"
  header, rows = _table_with(page, "7 train")
  assert list(rows) == ["1 world", "7 train", "9c generator", "10 stage 2", "total"]  # in stage order
  assert rows["7 train"][1:4] == ["393.5", "1.72", "62.9%"] and rows["total"][1] == "625.3"
  _, rows = _table_with(page, "7")
  assert rows["7"][1:] == ["a red circle (train)", "a red circle (stage2)", "one red circle"]
  _, rows = _table_with(page, "captioning/semantic/relations_precision")
  assert rows["captioning/semantic/relations_precision"][1] == "nan"
  with open(tmp_path / "demo" / "report" / "report.md") as f:
    markdown = f.read()
  assert "| CIDEr-D | x1 | 122.6 | 41.0 | 100.9 | 2.072 | 2.154 |" in markdown
  assert "| full | 4.400 | 2.154 | 0.589 |" in markdown


def test_every_image_resolves_beside_the_page(tmp_path):
  path = report.write_report(make_demo_out(tmp_path / "demo"))
  page, folder = _read_page(path), os.path.dirname(path)
  assert sorted(page.images) == sorted(["captions.png", "curves_stage2.png", "curves_train.png",
                                        "train_generation_800.png", "stage2_generation_100.png",
                                        "train_reconstructions_800.png"])  # stage 2's equal reconstructions once
  for src in page.images:
    assert src.startswith("data:") or os.path.isfile(os.path.join(folder, src)), src
    if not src.startswith("data:"):
      assert Image.open(os.path.join(folder, src)).size[0] > 0
  with Image.open(os.path.join(folder, "train_generation_800.png")) as grid:
    assert grid.size == (48, 32) and grid.getpixel((0, 0)) == (200, 30, 30)
  assert sorted(os.listdir(folder)) == sorted(page.images + ["index.html", "report.md"])


def test_curves_draw_losses_with_their_shuffled_twin_and_skip_the_rest():
  rows = [{"step": 1, "i2t/loss": 3.0, "lr": 0.1, "validation_loss/i2t/loss": 2.0,
           "validation_loss/i2t/shuffled_loss": 2.5, "clip/cos": 0.4, "steps_per_sec": 2.0, "note": "x",
           "t2i/loss": float("nan")}, {"step": 2, "t2i/loss": float("inf"), "i2t/accuracy": True}]
  panels = report._curve_panels(rows)  # pylint: disable=protected-access
  assert panels == {"clip/cos": ["clip/cos"], "i2t/loss": ["i2t/loss"],
                    "validation_loss/i2t/loss": ["validation_loss/i2t/loss", "validation_loss/i2t/shuffled_loss"]}


def test_missing_parts_are_left_out_with_a_note(tmp_path):
  demo = make_demo_out(tmp_path / "demo", full=False)
  page = _read_page(report.write_report(demo))
  assert page.images == []
  notes = " ".join(page.notes)
  for expected in ("No evaluation results", "No ablation table", "no train/metrics.jsonl", "no clip/metrics.jsonl",
                   "stage 1 (joint I2T + T2I): no evaluation", "captions.png missing"):
    assert expected in notes, (expected, notes)
  _, rows = _table_with(page, "1 world")  # the timings still there
  assert rows["total"][1] == "625.3"
  assert page.headings == ["Metrics beside the paper", "Ablations (the paper's Table 1)", "Loss curves",
                           "Caption → image", "Image → caption", "Timings", "All figures"]


def test_missing_demo_out_or_summary_is_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match=f"{tmp_path / 'nowhere'}: no such directory"):
    report.write_report(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(errors.UserError, match=str(tmp_path / "empty" / "summary.json")):
    report.write_report(str(tmp_path / "empty"))
  (tmp_path / "empty" / "summary.json").write_text("{not json")
  with pytest.raises(errors.UserError, match="not JSON"):
    report.write_report(str(tmp_path / "empty"))
  assert os.listdir(tmp_path / "empty") == ["summary.json"]  # nothing half-written left behind


def test_a_rewrite_replaces_the_old_report_whole(tmp_path):
  demo = make_demo_out(tmp_path / "demo")
  report.write_report(demo)
  (tmp_path / "demo" / "report" / "stale.png").write_bytes(b"old")
  shutil.rmtree(tmp_path / "demo" / "stage2")
  path = report.write_report(demo)
  files = os.listdir(os.path.dirname(path))
  assert "stale.png" not in files and "stage2_generation_100.png" not in files
  assert sorted(os.listdir(tmp_path / "demo")) == ["ablations", "captions.png", "report", "summary.json", "train"]
  assert "Stage 2 left out" in " ".join(_read_page(path).notes)


def test_a_failed_write_keeps_the_old_report_and_no_temporary_folder(tmp_path, monkeypatch):
  demo = make_demo_out(tmp_path / "demo")
  path = report.write_report(demo)
  with open(path) as f:
    before = f.read()

  def fail(summary):
    raise RuntimeError(f"disk full after {len(summary)} rows")

  monkeypatch.setattr(report, "_timing_section", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    report.write_report(demo)
  with open(path) as f:
    assert f.read() == before
  assert sorted(os.listdir(tmp_path / "demo")) == ["ablations", "captions.png", "report", "stage2", "summary.json",
                                                  "train"]


def test_command_line(tmp_path):
  demo = make_demo_out(tmp_path / "demo", full=False)
  out = tmp_path / "elsewhere" / "page"
  ok = subprocess.run([sys.executable, "-m", "bigen_jax.report", f"--demo_out={demo}", f"--out={out}"],
                      capture_output=True, text=True, check=False)
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip() == str(out / "index.html") and os.path.isfile(out / "index.html")
  assert "report" not in os.listdir(demo)
  bad = subprocess.run([sys.executable, "-m", "bigen_jax.report", f"--demo_out={tmp_path / 'nowhere'}"],
                       capture_output=True, text=True, check=False)
  assert bad.returncode == 2
  assert bad.stderr.startswith("error: ") and str(tmp_path / "nowhere") in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # ~60 s in headless Chromium (where installed); the tests above parse the page's HTML
def test_the_page_in_a_browser(tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
  sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
  path = report.write_report(make_demo_out(tmp_path / "demo"))
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
    try:
      page = browser.new_page(viewport={"width": 1200, "height": 800})
      page.goto(f"file://{path}")
      page.wait_for_load_state("load")
      rows = page.eval_on_selector_all("table tr", "rows => rows.map(r => Array.from(r.cells, c => c.innerText))")
      images = page.eval_on_selector_all(
          "img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.clientWidth])")
      page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    finally:
      browser.close()
  assert ["CIDEr-D", "x1", "122.6", "41.0", "100.9", "2.072", "2.154"] in rows
  full = ["full", "4.400", "2.154", "0.589", "–", "–", "–", "9.930"] + ["–"] * 4 + [paper.TABLE1["full"]]
  assert full in rows
  assert len(images) == 6
  for src, complete, natural, shown in images:
    assert complete and natural > 0 and shown > 0, src
  assert Image.open(tmp_path / "page.png").size[0] == 1200
