r"""The results report of a finished ``make demo``: one self-contained page, ``report/index.html``, and its markdown
copy ``report/report.md``.

  python -m bigen_jax.report --demo_out demo_out
  python -m bigen_jax.report --demo_out /tmp/demo12 --out /tmp/report_check/report   # demo_out left untouched

It holds the evaluation figures of stage 1 and stage 2 beside the paper's (``bigen_jax.paper``), the ablation table
of ``scripts/ablations.py`` when one is found, loss curves drawn from the runs' ``metrics.jsonl``, the evaluators'
caption -> image grids and the image -> caption sheet (copied beside the page), and the stages' timings from
``summary.json``. An optional part that is missing is left out with a one-line note. The page is built in a
temporary folder that is then renamed over the old report. Local paths only.
"""

import filecmp
import glob
import html
import json
import math
import os
import re
import shutil
import tempfile
from typing import NamedTuple

from bigen_jax import errors, fileio, paper

# Runs whose metrics.jsonl are drawn, with their titles.
RUNS = (("train", "stage 1 (joint I2T + T2I)"), ("stage2", "stage 2 (SCST, CLIP loss, T2I)"),
        ("generator", "SPADE generator"), ("clip", "demo CLIP"))
# (measure, the paper's name for it in paper.TABLE2 or None, our result key, what ours measures).
HEADLINE = (
    ("BLEU-4", "BLEU-4", "captioning/BLEU-4", "x1"),
    ("METEOR", "METEOR", "captioning/METEOR", "x1"),
    ("ROUGE-L", "ROUGE-L", "captioning/ROUGE-L", "x1"),
    ("CIDEr-D", "CIDEr-D", "captioning/CIDEr-D", "x1"),
    ("SPICE", "SPICE", None, "not computed"),
    ("CLIPScore", "CLIPScore", "generation/clip_score", "demo CLIP, argmax mask-predict-4"),
    ("FID", "FID", "generation/fid_recognizer", "scene recogniser's features"),
    ("R-precision hard", "R-precision hard (ViLBERT)", "generation/r_precision_hard", "ranker: scene recogniser"),
    ("R-precision easy", "R-precision easy (ViLBERT)", "generation/r_precision_easy", "ranker: scene recogniser"),
    ("CLIP R-precision hard", "R-precision hard (CLIP)", "generation/clip_r_precision_hard", "demo CLIP"),
    ("CLIP R-precision easy", "R-precision easy (CLIP)", "generation/clip_r_precision_easy", "demo CLIP"),
    ("captions true of the scene", None, "captioning/semantic/accuracy", "claim checker"),
    ("distinct captions", None, "captioning/distinct_captions", "share of images"),
    ("CLIP-S of the captions", None, "captioning/clip_s", "demo CLIP"),
    ("semantic accuracy", None, "generation/semantic/accuracy", "scene recogniser"),
    ("guided CLIPScore", None, "generation/guidance/clip_score", "guidance w = 4"),
    ("guided FID", None, "generation/guidance/fid_recognizer", "guidance w = 4"),
    ("guided semantic accuracy", None, "generation/guidance/semantic/accuracy", "guidance w = 4"),
    ("guided R-precision hard", None, "generation/guidance/r_precision_hard", "guidance w = 4"),
    ("validation loss gap I2T", None, "validation_loss/i2t/gap", "shuffled - true"),
    ("validation loss gap T2I", None, "validation_loss/t2i/gap", "shuffled - true"),
)
ABLATION_KEYS = (("CIDEr-D", "captioning/CIDEr-D"), ("BLEU-4", "captioning/BLEU-4"),
                 ("captions true", "captioning/semantic/accuracy"), ("CLIP-S", "captioning/clip_s"),
                 ("CLIPScore", "generation/clip_score"), ("FID", "generation/fid_recognizer"),
                 ("guided CLIPScore", "generation/guidance/clip_score"),
                 ("guided FID", "generation/guidance/fid_recognizer"),
                 ("guided semantic acc.", "generation/guidance/semantic/accuracy"),
                 ("guided R-prec. hard", "generation/guidance/r_precision_hard"))
# Scalars drawn in the loss curves: one panel each (a shuffled loss joins its loss's panel).
CURVE_KEY = re.compile(r"(loss|accuracy|reward_\w+|/cos|/gap)$")
CAPTION_ROWS = 12
_NUMBER = re.compile(r"^([-+]?(\d+\.?\d*|\.\d+|nan|inf)(e[-+]?\d+)?%?|–)$")
_TIME = re.compile(r"([\d.]+)s(?: \(([\d.]+) cores busy\))?")
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 0 24px 48px; max-width: 1500px; color: #222; }
h1 { margin-top: 24px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; vertical-align: top; }
th { background: #f2f2f2; text-align: left; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.wide { overflow-x: auto; max-width: 100%; }
.figs { display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: flex-start; }
figure { margin: 12px 0 16px; flex: 0 1 auto; min-width: 0; max-width: 100%; }
figcaption { color: #555; margin-top: 4px; max-width: 900px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #ddd; }
.note { color: #8a5a00; } .bar { background: #4a7ebb; height: 12px; min-width: 1px; }
details { margin: 12px 0; } summary { cursor: pointer; font-weight: 600; }
"""


class Bar(NamedTuple):
  """A table cell drawn as a bar of ``fraction`` of the cell's width (markdown: a percentage)."""
  fraction: float


def write_report(demo_out: str, *, out: str | None = None, ablations_dir: str | None = None) -> str:
  """Writes the report of ``demo_out`` into ``out`` (default ``demo_out/report``), replacing an old one; returns
  the path of its index.html. ``ablations_dir``: where ``scripts/ablations.py`` wrote its table (default
  ``demo_out/ablations``). Raises ``errors.UserError`` when ``demo_out`` or its summary.json is missing or bad."""
  demo_out = os.path.abspath(demo_out)
  summary = _read_summary(demo_out)
  out = os.path.abspath(out or os.path.join(demo_out, "report"))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=os.path.dirname(out))
  os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the page from a web server
  try:
    results = {run: _latest_results(os.path.join(demo_out, run)) for run in ("train", "stage2")}
    sections = [
        ("Metrics beside the paper", _metrics_section(results)),
        ("Ablations (the paper's Table 1)", _ablation_section(ablations_dir or os.path.join(demo_out, "ablations"))),
        ("Loss curves", _curves_section(demo_out, tmp)),
        ("Caption → image", _generation_section(demo_out, results, tmp)),
        ("Image → caption", _caption_section(demo_out, results, tmp)),
        ("Timings", _timing_section(summary)),
        ("All figures", _all_figures_section(results, summary)),
    ]
    fileio.write_atomic(os.path.join(tmp, "index.html"), _html(demo_out, sections))
    fileio.write_atomic(os.path.join(tmp, "report.md"), _markdown(demo_out, sections))
    fileio.replace_directory(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return os.path.join(out, "index.html")


def _read_summary(demo_out: str) -> dict:
  if not os.path.isdir(demo_out):
    raise errors.UserError(f"--demo_out {demo_out}: no such directory (run make demo first)")
  path = os.path.join(demo_out, "summary.json")
  if not os.path.exists(path):
    raise errors.UserError(f"{path}: missing; make demo writes it when it finishes")
  try:
    summary = fileio.read_json(path)
  except ValueError as e:
    raise errors.UserError(f"{path}: not JSON ({e})") from e
  if not isinstance(summary, dict):
    raise errors.UserError(f"{path}: expected a JSON object, got {type(summary).__name__}")
  return summary


def _latest_results(run: str) -> tuple[int, dict] | None:
  """(step, figures) of the run's newest eval/results_<step>.json, or None."""
  found = []
  for path in glob.glob(os.path.join(run, "eval", "results_*.json")):
    match = re.fullmatch(r"results_(\d+)\.json", os.path.basename(path))
    if match:
      found.append((int(match.group(1)), path))
  for step, path in sorted(found, reverse=True):
    try:
      results = fileio.read_json(path)
    except ValueError:
      continue
    if isinstance(results, dict):
      return step, results
  return None


def _fmt(value) -> str:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return "–" if value is None else str(value)
  return f"{value:.3f}" if math.isfinite(value) else str(value).lower()


def _metrics_section(results: dict) -> list:
  runs = [(name, r) for name, r in (("stage 1", results["train"]), ("stage 2", results["stage2"])) if r]
  if not runs:
    return [("note", "No evaluation results (train/eval/results_<step>.json): stage 11 of make demo did not run.")]
  models = list(paper.TABLE2)
  header = ["measure", "ours: how"] + [f"paper: {m}" for m in models] + [f"{n} (step {r[0]})" for n, r in runs]
  rows = []
  for label, paper_key, key, how in HEADLINE:
    figures = [_paper_figure(paper.TABLE2[m].get(paper_key)) for m in models]
    rows.append([label, how] + figures + [_fmt(r[1].get(key)) if key else "–" for _, r in runs])
  blocks = [("text", "The paper's figures are on COCO (x100, OpenAI's CLIP, Inception FID); ours on the demo world "
             "(validation split, x1, the demo CLIP, FID in the scene recogniser's space): compare directions, not "
             "values."), ("table", header, rows)]
  if not results["stage2"]:
    blocks.append(("note", "Stage 2 left out: no stage2/eval/results_<step>.json."))
  return blocks


def _paper_figure(value) -> str:
  return "–" if value is None else f"{value:.1f}"


def _ablation_section(folder: str) -> list:
  blocks = []
  for split in ("validation", "test"):
    path = os.path.join(folder, f"ablations_{split}.json")
    try:
      rows = fileio.read_json(path) if os.path.exists(path) else None
    except ValueError:
      blocks.append(("note", f"{path}: not JSON, left out."))
      continue
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    if not rows:
      continue
    header = ["row", "minutes"] + [c for c, _ in ABLATION_KEYS] + ["paper (COCO, Table 1)"]
    table = [[r.get("row", "?"), _fmt(r.get("minutes"))] + [_fmt(r.get(k)) for _, k in ABLATION_KEYS]
             + [paper.TABLE1.get(r.get("row"), "–")] for r in rows]
    blocks += [("text", f"Split {split}: {path}"), ("table", header, table)]
  return blocks or [("note", f"No ablation table in {folder} "
                     "(python scripts/ablations.py --demo_out DEMO_OUT --out DEMO_OUT/ablations).")]


def _read_rows(path: str) -> list[dict]:
  """metrics.jsonl's rows; a line that is not a JSON object (a half-written last line) is skipped."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
        rows.append(row)
  return rows


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _curve_panels(rows: list[dict]) -> dict[str, list[str]]:
  """Panel title -> the keys drawn in it."""
  keys = sorted({k for r in rows for k, v in r.items() if CURVE_KEY.search(k) and _finite(v)})
  panels = {}
  for key in keys:
    base = key[:-len("shuffled_loss")] + "loss" if key.endswith("/shuffled_loss") else key
    panels.setdefault(base if base in keys else key, []).append(key)
  return panels


def plot_curves(rows: list[dict], path: str, title: str) -> str | None:
  """Draws one panel per scalar of ``rows`` (metrics.jsonl) against the step into a PNG; None when none."""
  panels = _curve_panels(rows)
  if not panels:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = min(4, len(panels))
  nrows = -(-len(panels) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.5 * nrows + 0.4), squeeze=False)
  for ax, (name, keys) in zip(axes.flat, panels.items()):
    for key in keys:
      points = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
      if points:
        ax.plot(*zip(*points), label=key.rsplit("/", 1)[-1], marker="o" if len(points) <= 5 else None, markersize=3)
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  with fileio.open_atomic(path) as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)
  return path


def _curves_section(demo_out: str, tmp: str) -> list:
  blocks = []
  for run, title in RUNS:
    path = os.path.join(demo_out, run, "metrics.jsonl")
    if not os.path.exists(path):
      blocks.append(("note", f"{title}: no {run}/metrics.jsonl, left out."))
      continue
    rows = _read_rows(path)
    if plot_curves(rows, os.path.join(tmp, f"curves_{run}.png"), f"{title}: {run}/metrics.jsonl"):
      blocks.append(("image", f"curves_{run}.png", f"{title} ({len(rows)} logged rows)"))
    else:
      blocks.append(("note", f"{title}: {run}/metrics.jsonl holds no loss or accuracy rows, left out."))
  return blocks


def _copy_image(src: str, tmp: str, name: str, caption: str, blocks: list, *, same_as: str = "") -> None:
  """Copies ``src`` beside the page as ``name`` and adds it, or a note when it is missing or equal to the file
  ``same_as`` (already shown)."""
  if same_as and os.path.exists(src) and os.path.exists(same_as) and filecmp.cmp(src, same_as, shallow=False):
    blocks.append(("text", f"{caption}: the same image as stage 1's, not repeated."))
  elif os.path.exists(src):
    shutil.copyfile(src, os.path.join(tmp, name))
    blocks.append(("image", name, caption))
  else:
    blocks.append(("note", f"{caption}: {src} missing, left out."))


def _generation_section(demo_out: str, results: dict, tmp: str) -> list:
  """The runs' caption -> image grids, then their reconstructions (stage 2's only where it differs)."""
  blocks, runs = [], [(run, title, results[run][0]) for run, title in RUNS[:2] if results[run]]
  blocks += [("note", f"{title}: no evaluation, no grids.") for run, title in RUNS[:2] if not results[run]]
  for run, title, step in runs:
    _copy_image(os.path.join(demo_out, run, "eval", f"generation_{step}.png"), tmp, f"{run}_generation_{step}.png",
                f"{title}, step {step}: caption, real image, drawings of the true tokens, one drawing per decoder "
                "and drawer", blocks)
  first = ""
  for run, title, step in runs:
    path = os.path.join(demo_out, run, "eval", f"reconstructions_{step}.png")
    _copy_image(path, tmp, f"{run}_reconstructions_{step}.png", f"{title}, step {step}: held-out images rebuilt "
                "from their true tokens (real | preview | scene decoder | GAN)", blocks, same_as=first)
    first = first or path
  return blocks


def _caption_section(demo_out: str, results: dict, tmp: str) -> list:
  blocks = []
  _copy_image(os.path.join(demo_out, "captions.png"), tmp, "captions.png",
              "stage 1: validation images with their greedy caption, a reference and the claim checker's verdict",
              blocks)
  captions = {}
  for run, title in RUNS[:2]:
    if results[run]:
      path = os.path.join(demo_out, run, "eval", f"captions_{results[run][0]}.json")
      try:
        captions[title.split(" (")[0]] = fileio.read_json(path) if os.path.exists(path) else None
      except ValueError:
        captions[title.split(" (")[0]] = None
  captions = {k: v for k, v in captions.items() if isinstance(v, dict)}
  if not captions:
    return blocks + [("note", "No captions_<step>.json in the runs' eval folders: caption table left out.")]
  first = next(iter(captions.values()))
  rows = []
  for image_id in list(first)[:CAPTION_ROWS]:
    entries = [c.get(image_id) if isinstance(c.get(image_id), dict) else {} for c in captions.values()]
    refs = entries[0].get("references") or ["–"]
    rows.append([image_id] + [e.get("caption", "–") for e in entries] + [refs[0]])
  header = ["image"] + [f"{name} caption" for name in captions] + ["first reference"]
  return blocks + [("text", f"The first {len(rows)} validation images."), ("table", header, rows)]


def _timing_section(summary: dict) -> list:
  times = []
  for key, value in summary.items():
    match = _TIME.match(str(value)) if key.startswith("time: ") else None
    if match and key != "time: total":
      times.append((key[len("time: "):], float(match.group(1)), match.group(2)))
  if not times:
    return [("note", "summary.json holds no 'time: ...' rows, left out.")]
  times.sort(key=lambda t: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", t[0])])
  total = _TIME.match(str(summary.get("time: total", "")))
  total_s = float(total.group(1)) if total else sum(t for _, t, _ in times)
  longest = max(t for _, t, _ in times) or 1.0
  rows = [[name, f"{t:.1f}", cores or "–", f"{100 * t / total_s:.1f}%", Bar(t / longest)] for name, t, cores in times]
  rows.append(["total", f"{total_s:.1f}", "–", "100.0%", ""])
  return [("table", ["stage", "seconds", "cores busy", "share", ""], rows)]


def _all_figures_section(results: dict, summary: dict) -> list:
  blocks = []
  runs = [(n, r) for n, r in (("stage 1", results["train"]), ("stage 2", results["stage2"])) if r]
  if runs:
    keys = sorted({k for _, r in runs for k in r[1]})
    rows = [[k] + [_fmt(r[1].get(k)) for _, r in runs] for k in keys]
    header = ["metric"] + [f"{n} (step {r[0]})" for n, r in runs]
    blocks.append(("details", f"Every evaluation figure ({len(keys)})", [("table", header, rows)]))
  rows = [[k, str(v)] for k, v in summary.items() if not k.startswith("time: ")]
  blocks.append(("details", f"summary.json ({len(rows)} rows besides the timings)",
                 [("table", ["what", "value"], rows, False)]))
  return blocks


def _anchor(title: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _html_cell(cell, tag: str, align: bool = True) -> str:
  """A table cell; with ``align`` a number is right-aligned."""
  if isinstance(cell, Bar):
    return f'<td><div class="bar" style="width:{160 * cell.fraction:.0f}px"></div></td>'
  text = str(cell)
  attrs = ' class="num"' if align and tag == "td" and _NUMBER.match(text.lower()) else ""
  return f"<{tag}{attrs}>{html.escape(text)}</{tag}>"


# Blocks of a section: ("text", str), ("note", str) for a part left out, ("table", header, rows[, align numbers]),
# ("image", file name beside the page, caption), ("details", title, blocks) folded away.


def _html_blocks(blocks: list) -> list[str]:
  """HTML of each block; a run of images shares one wrapping row."""
  parts = []
  for i, block in enumerate(blocks):
    kind = block[0]
    if kind == "image" and (i == 0 or blocks[i - 1][0] != "image"):
      parts.append('<div class="figs">')
    if kind == "text":
      parts.append(f"<p>{html.escape(block[1])}</p>")
    elif kind == "note":
      parts.append(f'<p class="note">{html.escape(block[1])}</p>')
    elif kind == "table":
      head = "".join(_html_cell(c, "th") for c in block[1])
      align = block[3] if len(block) > 3 else True
      body = "".join("<tr>" + "".join(_html_cell(c, "td", align) for c in row) + "</tr>\n" for row in block[2])
      parts.append(f'<div class="wide"><table>\n<tr>{head}</tr>\n{body}</table></div>')
    elif kind == "image":
      name, caption = html.escape(block[1], quote=True), html.escape(block[2])
      parts.append(f'<figure><a href="{name}"><img src="{name}" alt="{caption}"></a>'
                   f"<figcaption>{caption}</figcaption></figure>")
      if i + 1 == len(blocks) or blocks[i + 1][0] != "image":
        parts.append("</div>")
    elif kind == "details":
      parts.append(f"<details><summary>{html.escape(block[1])}</summary>{''.join(_html_blocks(block[2]))}</details>")
  return parts


def _html(demo_out: str, sections: list) -> str:
  nav = " ".join(f'<a href="#{_anchor(t)}">{html.escape(t)}</a>' for t, _ in sections)
  body = "\n".join(f'<h2 id="{_anchor(t)}">{html.escape(t)}</h2>\n' + "\n".join(_html_blocks(b)) for t, b in sections)
  return (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>bigen_jax demo report</title>\n'
          f"<style>{_CSS}</style></head>\n<body>\n<h1>bigen_jax demo report</h1>\n"
          f"<p>Outputs of <code>{html.escape(demo_out)}</code>.</p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n")


def _md_cell(cell) -> str:
  if isinstance(cell, Bar):
    return ""
  return str(cell).replace("|", "\\|").replace("\n", " ")


def _md_blocks(blocks: list) -> list[str]:
  parts = []
  for block in blocks:
    kind = block[0]
    if kind == "text":
      parts.append(block[1])
    elif kind == "note":
      parts.append(f"*{block[1]}*")
    elif kind == "table":
      lines = ["| " + " | ".join(_md_cell(c) for c in block[1]) + " |", "|---" * len(block[1]) + "|"]
      lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block[2]]
      parts.append("\n".join(lines))
    elif kind == "image":
      parts.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*")
    elif kind == "details":
      parts.append(f"**{block[1]}**\n\n" + "\n\n".join(_md_blocks(block[2])))
  return parts


def _markdown(demo_out: str, sections: list) -> str:
  parts = ["# bigen_jax demo report", f"Outputs of `{demo_out}`."]
  for title, blocks in sections:
    parts += [f"## {title}"] + _md_blocks(blocks)
  return "\n\n".join(parts) + "\n"


def main() -> None:
  """The command line (module docstring); user errors are one line on stderr (``cli.run``)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from bigen_jax import cli  # pylint: disable=g-import-not-at-top
  demo_out = flags.DEFINE_string("demo_out", None, "A finished make demo's output directory.", required=True)
  out = flags.DEFINE_string("out", None, "Where the report goes (default: DEMO_OUT/report).")
  ablations = flags.DEFINE_string("ablations", None, "scripts/ablations.py's --out (default: DEMO_OUT/ablations).")

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(write_report(demo_out.value, out=out.value, ablations_dir=ablations.value))

  cli.run(run)


if __name__ == "__main__":
  main()
