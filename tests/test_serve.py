"""The playground (``bigen_jax.serve``) in headless Chromium on the bundle of a tiny trained run: a typed caption
becomes the picture ``Pipeline.generate`` draws, a dropped PNG gets the caption ``Pipeline.caption`` gives; and
``python -m bigen_jax.serve``'s user errors (gradio missing, a missing or corrupt bundle, a port in use) are one
line with exit status 2."""

import io
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bigen_jax.data import images
from bigen_jax.eval import eval_set
from test_pipeline import trained  # pylint: disable=unused-import  (the fixture: a 2-step run and its bundle)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
# Runs the command with gradio unimportable, as where the [serve] extra is not installed.
NO_GRADIO = ("import runpy, sys; sys.modules['gradio'] = None; sys.argv = ['serve'] + sys.argv[1:]; "
             "runpy.run_module('bigen_jax.serve', run_name='__main__')")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_the_page_draws_captions_and_captions_pictures(trained, tmp_path):
  pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[serve]')")
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
  sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
  from bigen_jax import Pipeline  # pylint: disable=g-import-not-at-top
  from bigen_jax import serve  # pylint: disable=g-import-not-at-top
  _, config, _, _, bundle = trained
  held_out = eval_set.load(config, split="validation", num_examples=1, image_size=64)
  path, text = str(tmp_path / "scene.png"), held_out["references"][0][0]
  Image.fromarray(held_out["images"][0]).save(path)
  pipe = Pipeline.load(bundle)
  want_caption = pipe.caption([images.decode_image(path)])[0]
  want_picture = np.asarray(pipe.generate([text])[0])
  assert want_caption.strip() and want_picture.std() > 0  # something the page can get wrong

  app = serve.build_app(pipe)
  url = serve.launch(app, port=free_port())
  try:
    with sync_api.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
      page = browser.new_page()
      page.goto(url)
      page.locator("#text textarea").fill(text)
      page.locator("#generate").click()
      page.wait_for_function("() => { const i = document.querySelector('#picture img');"
                             "return i !== null && i.complete && i.naturalWidth > 0; }", timeout=60_000)
      src = page.locator("#picture img").get_attribute("src")
      got = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
      np.testing.assert_array_equal(got, want_picture)
      sync_api.expect(page.locator("#used")).to_contain_text("seed 0")

      page.locator("#caption-tab-button").click()
      page.locator("#source input[type=file]").set_input_files(path)  # the upload captions it
      sync_api.expect(page.locator("#caption textarea")).to_have_value(want_caption, timeout=60_000)
      browser.close()
  finally:
    app.close()


def test_the_command_prints_user_errors_as_one_line(tmp_path):
  pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[serve]')")
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "bundle.json").write_text("{not json")
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    serve = [sys.executable, "-m", "bigen_jax.serve", "--port", str(free_port()), "--bundle"]
    commands = {"missing": (serve + [str(tmp_path / "none")], str(tmp_path / "none") + "/bundle.json is missing"),
                "corrupt": (serve + [str(corrupt)], f"{corrupt}/bundle.json is not JSON"),
                "port": (serve[:3] + ["--port", str(port), "--bundle", str(corrupt)],
                         f"--port={port}: cannot listen on 127.0.0.1:{port}"),
                "gradio": ([sys.executable, "-c", NO_GRADIO, "--bundle", str(corrupt)], "pip install -e '.[serve]'")}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (cmd, _) in commands.items()}
    for name, proc in procs.items():
      _, stderr = proc.communicate(timeout=120)
      assert proc.returncode == 2, (name, stderr[-2000:])
      lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
      assert len(lines) == 1 and commands[name][1] in lines[0], (name, stderr[-2000:])


def test_importing_the_module_needs_no_gradio():
  code = "import sys; sys.modules['gradio'] = None; import bigen_jax.serve; print('imported')"
  assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        check=True).stdout.strip() == "imported"
