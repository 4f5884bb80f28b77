"""``bigen_jax.evaluate`` on a tiny trained run: the sharded, batched, padded evaluators decode exactly what
the plain decoders give on the whole eval set at once, and results land as JSON and a markdown table."""

import json
import os
import shutil
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigen_jax import evaluate
from bigen_jax import experiment
from bigen_jax import metrics as metrics_lib
from bigen_jax import train
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab
from bigen_jax.eval import captioning
from bigen_jax.eval import eval_set
from bigen_jax.eval import generation
from bigen_jax.sampling import captions as captions_lib
from bigen_jax.sampling import image_tokens
from configs import demo
from conftest import write_records

pytestmark = pytest.mark.skipif(not __import__("shutil").which("java"), reason="pycocoevalcap needs Java")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("eval_run"))
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  write_records(records_dir, splits={"train": 24, "validation": 13}, dim=8, max_len=6, images=True)
  vocab.build_vocab(records_dir, vocab_dir, k=6, iterations=5, sample_size=1000, seed=0)
  vocab_txt = os.path.join(root, "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(200)]) + "\n")
  config = demo.get_config("tiny")
  config.data.update(dict(records_dir=records_dir, vocab_dir=vocab_dir, tokenizer=vocab_txt))
  config.update(dict(total_steps=2, log_every=1))
  config.eval.update(dict(every=2, evaluators=("validation_loss", "captioning", "generation")))
  config.eval.captioning.update(dict(batch_size=8, spice=False))
  config.eval.generation.update(dict(batch_size=8, grid_images=4))
  workdir = os.path.join(root, "run")
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, jax.device_get(state.params)


def test_evaluate_writes_results_and_matches_plain_decoding(run):
  config, workdir, params = run
  logged = metrics_lib.read_history(workdir)
  assert any("captioning/CIDEr-D" in r and "generation/cell_accuracy" in r for r in logged)  # the trainer ran them
  results, step = evaluate.evaluate(config, workdir, evaluators=["captioning", "generation"])
  assert step == 2
  for key in ("captioning/BLEU-4", "captioning/CIDEr-D", "captioning/METEOR", "captioning/ROUGE-L",
              "generation/cell_accuracy"):
    assert key in results, key
  assert all(np.isfinite(v) for v in results.values())
  with open(os.path.join(workdir, "eval", "results_2.json")) as f:
    assert json.load(f) == pytest.approx(results)
  assert os.path.exists(os.path.join(workdir, "eval", "results_2.md"))
  assert os.path.exists(os.path.join(workdir, "eval", "generation_2.png"))

  ctx = experiment.build_context(config, workdir)
  data = eval_set.load(ctx.config, split="validation")
  assert len(data["index"]) == 13  # not a multiple of the batch: the last batch is padded
  tok = ctx.tokenizer
  plain = captions_lib.greedy_captions(
      params, model=ctx.model, visual={"visual_feats": data["dense"].astype(np.float32)}, boxes=data["boxes"],
      max_len=ctx.config.model.max_len, tokens=captions_lib.Tokens.from_tokenizer(tok, banned=(tok.unk_id,)))
  with open(os.path.join(workdir, "eval", "captions_2.json")) as f:
    written = json.load(f)
  assert [written[str(i)]["caption"] for i in data["image_id"]] == tok.decode(np.asarray(plain))
  ids, _ = image_tokens.parallel_decode(params, jax.random.key(0), model=ctx.model, text_ids=data["text_ids"],
                                        text_mask=data["text_mask"], boxes=data["boxes"],
                                        codebook=ctx.frozen["codebook"])
  expected = float((np.asarray(ids) == data["cluster_ids"]).mean())
  assert results["generation/cell_accuracy"] == pytest.approx(expected, abs=1e-7)


def test_evaluators_shard_over_eight_devices(run):
  """The same captions and cluster ids with the eval batch split over an 8-device mesh."""
  base, workdir, params = run
  outputs = []
  for devices in (1, 8):
    config = base.copy_and_resolve_references()
    config.mesh.num_devices = devices
    ctx = experiment.build_context(config, workdir)
    with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
      cap = captioning.Evaluator(ctx)
      gen = generation.Evaluator(ctx)
      outputs.append((cap.captions(params), gen.generate(params)))
  assert outputs[0][0] == outputs[1][0]
  np.testing.assert_array_equal(outputs[0][1], outputs[1][1])


@pytest.mark.slow  # ~40 s: two processes; test_evaluators_shard_over_eight_devices checks the sharded evaluation
def test_two_processes_evaluate_like_one(run, tmp_path):
  """``python -m bigen_jax.evaluate`` as two processes (one CPU device each, 7 + 6 eval records: the shorter
  share padded): each decodes its share, process 0 scores the gathered whole, and the results and captions are
  those of one process."""
  config, workdir, _ = run
  single, _ = evaluate.evaluate(config, workdir, evaluators=["captioning", "generation"])
  with open(os.path.join(workdir, "eval", "captions_2.json")) as f:
    single_captions = json.load(f)
  multi = str(tmp_path / "multi")
  shutil.copytree(workdir, multi)
  shutil.rmtree(os.path.join(multi, "eval"))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen(
      [sys.executable, "-m", "bigen_jax.evaluate", "--workdir", multi, "--evaluators", "captioning,generation",
       "--config.mesh.num_devices=0", "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
       "--config.distributed.cpu_collectives=gloo", f"--config.distributed.coordinator_address=127.0.0.1:{port}"],
      cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
  with open(os.path.join(multi, "eval", "results_2.json")) as f:
    assert json.load(f) == pytest.approx(single, abs=1e-6)
  with open(os.path.join(multi, "eval", "captions_2.json")) as f:
    assert json.load(f) == single_captions
