"""Test-session settings: 8 simulated CPU devices, fast CPU compiles and a session-wide compilation cache, no
network for Hugging Face, quiet TF."""

import atexit
import os
import shutil
import tempfile

# LLVM optimisation level 0: compiles about 3x faster on CPU; tests run small programs once.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent XLA compilation cache for the session and the subprocesses it starts: many tests compile the same
# tiny programs (a trainer resumed five times compiles its step once). Fresh each session and removed at its end, so
# no run reads an executable an earlier one wrote.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigen_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


QA_TYPES = ("number", "other", "yes/no")
QA_MAX_ANSWERS = 10


def qa_fixture(i):
  """Record i's questions in ``write_records(questions=True)``: ``i % 4`` of them (record 0 none), question j
  ``(ids [L], text, type, answers [10])``; ids [CLS] 200+i 20+j [SEP]; 10 annotators' answers, one of them for
  every fifth question (padded with "")."""
  out = []
  for j in range(i % 4):
    first = f"a{(i + j) % 4}"
    if (i + j) % 5:
      k = (i + 3 * j) % 11
      given = [first] * k + ["yes"] * (QA_MAX_ANSWERS - k)
    else:
      given = [first] + [""] * (QA_MAX_ANSWERS - 1)
    out.append(([2, 200 + i, 20 + j, 3], f"question {j} of {i}?", QA_TYPES[(i + j) % 3], given))
  return out


def write_records(out_dir, *, splits=None, dim=8, shard_size=10, max_len=6, max_captions=3, seed=0,
                  clusters=5, images=False, questions=False):
  """A records directory written directly with the schema (no backbone, no tokenizer).

  Dense features are ``clusters`` well-separated blobs; record i of a split has ``1 + i % max_captions``
  captions whose ids encode (index, caption number). With ``images`` each record also holds a 32x32 PNG
  whose 8x8 cells (4x4 pixels) have random colours. With ``questions`` records hold ``qa_fixture(i)``'s
  questions (``max_answers`` 10). Returns the manifest.
  """
  import io
  from PIL import Image
  from bigen_jax import fileio
  from bigen_jax.data import records
  splits = splits or {"train": 37, "validation": 13}
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim)).astype(np.float32) * 10
  manifest = {"version": records.SCHEMA_VERSION, "backbone": "fixture", "feature_dim": dim,
              "grid": records.GRID, "max_len": max_len, "max_captions": max_captions, "store_images": images,
              "splits": {}}
  if questions:
    manifest.update(questions=True, max_answers=QA_MAX_ANSWERS)
  for split, n in splits.items():
    num_shards = -(-n // shard_size)
    shards = []
    for s in range(num_shards):
      serialized, num_questions = [], 0
      for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
        label = rng.integers(clusters, size=records.NUM_CELLS)
        dense = centres[label] + rng.normal(size=(records.NUM_CELLS, dim)).astype(np.float32) * 0.1
        num = 1 + i % max_captions
        ids = np.zeros((num, max_len), np.int64)
        ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = 2, 100 + i, np.arange(num) + 10, 3
        image = b""
        if images:
          colours = rng.integers(0, 256, (records.GRID, 1, records.GRID, 1, 3), dtype=np.uint8)
          pixels = np.broadcast_to(colours, (records.GRID, 4, records.GRID, 4, 3)).reshape(32, 32, 3)
          buf = io.BytesIO()
          Image.fromarray(pixels).save(buf, format="PNG")
          image = buf.getvalue()
        qa = {}
        if questions:
          rows = qa_fixture(i)
          q_ids = np.zeros((len(rows), max_len), np.int64)
          for j, row in enumerate(rows):
            q_ids[j, :len(row[0])] = row[0]
          qa = {"question_ids": q_ids, "questions": [r[1] for r in rows], "question_types": [r[2] for r in rows],
                "answers": [r[3] for r in rows]}
          num_questions += len(rows)
        serialized.append(records.encode_example(
            index=i, image_id=1000 + i, key=f"{split}/{i}", dense=dense, boxes=records.grid_boxes(),
            caption_ids=ids, captions=[f"caption {c} of {i}" for c in range(num)], image=image, **qa))
      path = os.path.join(out_dir, records.shard_name(split, s, num_shards))
      os.makedirs(out_dir, exist_ok=True)
      shards.append(records.write_shard(path, serialized))
      if questions:
        shards[-1]["num_questions"] = num_questions
    manifest["splits"][split] = {"num_examples": n, "shards": shards, "complete": True}
  fileio.write_json_atomic(os.path.join(out_dir, records.MANIFEST_NAME), manifest)
  return manifest


def write_training_data(root, *, splits, images=False, questions=False, words=200):
  """Records (``write_records``, 8-d features, captions of 6 tokens), their 6-cluster visual vocabulary and a
  WordPiece vocabulary file of ``words`` words under ``root``: what a training config's ``data`` needs. With
  ``questions`` the records hold ``qa_fixture``'s questions and the counted answer vocabulary is built beside them.
  Returns its fields."""
  from bigen_jax.data import answers
  from bigen_jax.data import tokenizer
  from bigen_jax.data import vocab
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  write_records(records_dir, splits=splits, dim=8, max_len=6, images=images, questions=questions)
  vocab.build_vocab(records_dir, vocab_dir, k=6, iterations=5, sample_size=1000, seed=0)
  vocab_txt = os.path.join(root, "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(words)]) + "\n")
  if questions:
    answers.build_answer_vocab(records_dir, split="train", min_count=1, vocabulary="counted").save(
        answers.default_path(records_dir))
  return {"records_dir": records_dir, "vocab_dir": vocab_dir, "tokenizer": vocab_txt}


@pytest.fixture
def records_dir(tmp_path):
  d = str(tmp_path / "records")
  write_records(d)
  return d
