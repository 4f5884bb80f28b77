"""The converters say in one line, naming the file, what they were given when it is not a usable state dict:
missing, text, JSON, truncated, an unsafe pickle, a bad .safetensors header, another model's state dict. None
of them advises the unsafe ``weights_only=False``."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from bigen_jax.convert import inception
from bigen_jax.convert import io
from bigen_jax.convert import lxmert
from test_model import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Arbitrary:
  """An object no weights-only load may build: unpickling it imports this module."""


def _message(path) -> str:
  """The one line ``load_state_dict`` raises for ``path``, checked to name it and to advise nothing unsafe."""
  with pytest.raises(io.ConversionError) as info:
    io.load_state_dict(str(path))
  message = str(info.value)
  assert "\n" not in message and message.startswith(f"{path}: "), message
  assert "weights_only" not in message, message
  return message


def test_bad_files_are_identified_in_one_line(tmp_path):
  assert _message(tmp_path / "missing.pth").endswith("no such file")
  (tmp_path / "notes.txt").write_text("these are my notes\nnot a checkpoint\n")
  assert "not a PyTorch checkpoint: it is a text file" in _message(tmp_path / "notes.txt")
  (tmp_path / "params.pth").write_text(json.dumps({"weight": [1, 2, 3]}))
  assert "not a PyTorch checkpoint: it is a JSON file" in _message(tmp_path / "params.pth")
  torch.save(torch.nn.Linear(8, 4).state_dict(), tmp_path / "whole.pth")
  data = (tmp_path / "whole.pth").read_bytes()
  (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
  assert "truncated or corrupt torch checkpoint" in _message(tmp_path / "truncated.pth")
  torch.save({"weight": torch.zeros(2), "extra": Arbitrary()}, tmp_path / "unsafe.pth")
  with open(tmp_path / "unsafe.pkl", "wb") as f:
    pickle.dump({"weight": Arbitrary()}, f)
  for name in ("unsafe.pth", "unsafe.pkl"):
    message = _message(tmp_path / name)
    assert "refused as unsafe" in message and f"{__name__}.Arbitrary" in message, message
  (tmp_path / "bad.safetensors").write_text("not a header")
  assert "not a valid .safetensors file" in _message(tmp_path / "bad.safetensors")
  torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pth")
  assert "holds no tensors" in _message(tmp_path / "meta.pth")


def test_other_models_and_near_misses_in_one_line(tmp_path):
  path = str(tmp_path / "linear.pth")
  torch.save(torch.nn.Linear(8, 4).state_dict(), path)
  state = io.load_state_dict(path)
  for what, convert in (("LXMERT", lambda s: lxmert.convert(s, model_config("tiny"))),
                        ("inception_v3", inception.params_from_torch)):
    with pytest.raises(io.ConversionError) as info, io.naming_file(path):
      convert(state)
    assert str(info.value) == (f"{path}: not a state dict of {what}: none of its 2 keys (bias, weight) names a "
                               f"parameter of {what}")
  near = {f"extra.{i}.weight": np.zeros(2, np.float32) for i in range(40)}
  near["embeddings.word_embeddings.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(io.ConversionError) as info:
    lxmert.convert(near, model_config("tiny"))
  message = str(info.value)
  assert "\n" not in message and len(message) < 2000, message
  assert "40 unknown source keys (no counterpart in the model) (e.g. extra.0.weight" in message, message
  assert "and 35 more" in message and "1 shape mismatches" in message and "backbone params missing" in message


def test_converter_tools_exit_2_with_one_line(tmp_path):
  (tmp_path / "params.pth").write_text(json.dumps({"weight": [1, 2, 3]}))
  torch.save(torch.nn.Linear(8, 4).state_dict(), tmp_path / "linear.pth")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  runs = [  # --verbose: the traceback must not carry torch's advice either
      (["convert_lxmert.py", f"--input={tmp_path / 'params.pth'}", f"--output={tmp_path / 'out.npz'}",
        f"--config={os.path.join(ROOT, 'configs', 'model.py')}:tiny", "--verbose"],
       f"error: {tmp_path / 'params.pth'}: not a PyTorch checkpoint: it is a JSON file", True),
      (["convert_inception.py", f"--torch_weights={tmp_path / 'linear.pth'}", f"--out={tmp_path / 'out.npz'}"],
       f"error: {tmp_path / 'linear.pth'}: not a state dict of inception_v3", False),
      (["convert_clip.py", f"--checkpoint={tmp_path / 'linear.pth'}", f"--out={tmp_path / 'out.npz'}"],
       f"error: {tmp_path / 'linear.pth'}: not a state dict of open_clip CLIP", False)]
  for args, start, verbose in runs:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", args[0]), *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert ("Traceback (most recent call last)" in proc.stderr) == verbose, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith(start), proc.stderr
    assert "weights_only=False" not in proc.stderr
  assert not os.path.exists(tmp_path / "out.npz")
