r"""The playground: a local page (Gradio) that draws typed captions and captions dropped images, with one bundle.

  python -m bigen_jax.serve --bundle demo_out/bundle [--port 7860] [--host 127.0.0.1]

Tab "caption -> picture": ``Pipeline.generate`` of the caption with the image-token decoder's settings (a preset of
the run's ``eval.generation`` decoders, then order, steps, temperature, guidance, seed; schedule, choice
temperature and readout under "more"). Tab "picture -> caption": ``Pipeline.caption`` of the dropped image, decoded
as ``python -m bigen_jax.generate --image`` decodes a file (greedy, beam with its size, or sampling with a seed).
Both run on the one ``Pipeline`` loaded at start, one request at a time.

Gradio is the optional ``[serve]`` extra, imported only here. User errors (gradio missing, a missing or corrupt
bundle, a port in use) print one line and exit with status 2 (``cli.run``); in the page, a bad input shows its
message and the page stays up.
"""

import os
import socket
import sys
import time
from typing import Any

from bigen_jax import cli
from bigen_jax import errors

CAPTION_DECODERS = ("greedy", "beam", "sample")
RUN_PRESET = "run default"
# Small pictures fill their frame with sharp pixels; the caption reads large.
CSS = """
#picture img, #source img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;}
#caption textarea {font-size: 1.25rem;}
"""


def import_gradio():
  """The ``gradio`` module (analytics off); a ``UserError`` saying how to install it when it is missing."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(f"the playground needs gradio ({e}): pip install -e '.[serve]'") from None
  return gradio


def check_port(host: str, port: int) -> None:
  """A ``UserError`` when ``host``:``port`` cannot be listened on (in use, bad host or port)."""
  if not 0 < port < 65536:
    raise errors.UserError(f"--port={port}: expected a TCP port, 1 to 65535")
  try:
    family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
  except socket.gaierror as e:
    raise errors.UserError(f"--host={host}: cannot resolve it ({e.strerror})") from None
  with socket.socket(family, kind) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it: TIME_WAIT is no conflict
    try:
      s.bind(address)
    except OSError as e:
      raise errors.UserError(f"--port={port}: cannot listen on {host}:{port} ({e.strerror}); another server is "
                             "probably using it: give another --port") from None


def _describe(settings: dict[str, Any], seed: int, seconds: float) -> str:
  return (f"`{settings['order']}`, {settings['num_steps']} steps, temperature {settings['temperature']:g}, "
          f"guidance {settings['guidance']:g}, {settings['schedule']} schedule, choice temperature "
          f"{settings['choice_temperature']:g}, readout {settings['readout']}, seed {seed}: {seconds:.1f} s")


def build_app(pipeline):
  """The playground's ``gradio.Blocks`` on ``pipeline`` (a ``bigen_jax.pipeline.Pipeline``); ``launch`` serves it."""
  gr = import_gradio()
  from bigen_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top  (JAX: not for errors)
  from bigen_jax.eval import generation  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import image_tokens  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import registry  # pylint: disable=g-import-not-at-top
  presets = {RUN_PRESET if name == "" else name: settings
             for name, settings in generation.decoder_settings(pipeline.config.eval.generation).items()}
  run = presets[RUN_PRESET]
  captioning = pipeline.config.eval.captioning
  meta = pipeline.bundle.meta
  drawer = "its SPADE generator" if pipeline.generator is not None else "the preview decoder (no generator bundled)"
  step = meta.get("run", {}).get("step")

  def draw(text, preset, order, steps, temperature, guidance, seed, schedule, choice_temperature, readout):
    del preset  # it only set the other fields
    if not text or not text.strip():
      raise gr.Error("type a caption first")
    settings = dict(steps=int(steps), order=order, temperature=float(temperature), guidance=float(guidance),
                    schedule=schedule, choice_temperature=float(choice_temperature), readout=readout)
    start = time.perf_counter()
    try:
      picture = pipeline.generate([text.strip()], seed=int(seed), **settings)[0]
      used = pipeline.decoder_settings(**settings)
    except errors.UserError as e:
      raise gr.Error(cli.one_line(str(e))) from None
    return picture, _describe(used, int(seed), time.perf_counter() - start)

  def caption(path, decoder, beam_size, seed):
    if not path:
      raise gr.Error("drop an image first")
    options = {"beam_size": int(beam_size)} if decoder == "beam" else {}
    try:
      return pipeline.caption([images_lib.decode_image(path)], decoder, seed=int(seed), **options)[0]
    except errors.UserError as e:
      raise gr.Error(cli.one_line(str(e))) from None

  def choose(preset):
    chosen = presets[preset]
    return (chosen["order"], chosen["num_steps"], chosen["temperature"], chosen["guidance"], chosen["schedule"],
            chosen["choice_temperature"], chosen["readout"])

  def show_options(decoder):
    return gr.update(visible=decoder == "beam"), gr.update(visible=decoder == "sample")

  with gr.Blocks(title="bigen_jax playground", analytics_enabled=False) as app:
    gr.Markdown(f"## bigen_jax playground\nBundle `{pipeline.bundle.path}`" + (f" (step {step})" if step else "")
                + f": captions of pictures, and pictures of captions drawn by {drawer}.")
    with gr.Tabs():
      with gr.Tab("caption → picture", id="generate", elem_id="generate-tab"):
        with gr.Row(equal_height=False):
          with gr.Column(scale=1):
            text = gr.Textbox(label="Caption", lines=2, elem_id="text",
                              placeholder="a caption, e.g. a red circle left of a blue square")
            preset = gr.Dropdown(list(presets), value=RUN_PRESET, label="Preset (the run's decoders)",
                                 elem_id="preset")
            with gr.Row():
              order = gr.Dropdown(sorted(registry.IMAGE_DECODERS), value=run["order"], label="Order")
              steps = gr.Slider(1, max(32, run["num_steps"]), value=run["num_steps"], step=1, label="Steps")
            with gr.Row():
              temperature = gr.Slider(0, 2, value=run["temperature"], step=0.05, label="Temperature")
              guidance = gr.Slider(0, max(10, run["guidance"]), value=run["guidance"], step=0.5, label="Guidance",
                                   elem_id="guidance")
            seed = gr.Number(0, precision=0, label="Seed", minimum=0)
            with gr.Accordion("more", open=False):
              schedule = gr.Radio(list(image_tokens.SCHEDULES), value=run["schedule"], label="Schedule")
              choice_temperature = gr.Slider(0, max(10, run["choice_temperature"]), value=run["choice_temperature"],
                                             step=0.5, label="Choice temperature")
              readout = gr.Radio(list(image_tokens.READOUTS), value=run["readout"], label="Readout")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
          with gr.Column(scale=1):
            picture = gr.Image(label="Picture", type="pil", format="png", interactive=False, height=384,
                               elem_id="picture")
            used = gr.Markdown(elem_id="used")
      with gr.Tab("picture → caption", id="caption", elem_id="caption-tab"):
        with gr.Row(equal_height=False):
          with gr.Column(scale=1):
            source = gr.Image(label="Picture (drop one here)", type="filepath", image_mode=None, format="png",
                              sources=["upload", "clipboard"], height=384, elem_id="source")
            default = captioning.decoder if captioning.decoder in CAPTION_DECODERS else "greedy"
            decoder = gr.Radio(list(CAPTION_DECODERS), value=default, label="Decoder")
            beam_size = gr.Slider(1, 8, value=captioning.get("beam_size", 3), step=1, label="Beam size",
                                  visible=default == "beam")
            caption_seed = gr.Number(0, precision=0, label="Seed", minimum=0, visible=default == "sample")
            run_caption = gr.Button("Caption", variant="primary", elem_id="run-caption")
          with gr.Column(scale=1):
            words = gr.Textbox(label="Caption", lines=3, interactive=False, elem_id="caption")

    options = [order, steps, temperature, guidance, seed, schedule, choice_temperature, readout]
    preset.change(choose, preset, [order, steps, temperature, guidance, schedule, choice_temperature, readout])
    for event in (generate.click, text.submit):
      event(draw, [text, preset] + options, [picture, used], concurrency_id="pipeline")
    decoder.change(show_options, decoder, [beam_size, caption_seed])
    for event in (run_caption.click, source.upload):
      event(caption, [source, decoder, beam_size, caption_seed], words, concurrency_id="pipeline")
  return app


def launch(app, *, host: str = "127.0.0.1", port: int = 7860) -> str:
  """Serves ``app`` (``build_app``) on ``host``:``port`` in a background thread; returns its URL."""
  gr = import_gradio()
  try:
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                           show_error=True, ssr_mode=False, theme=gr.themes.Default(), css=CSS)
  except OSError as e:
    raise errors.UserError(f"cannot serve on {host}:{port}: {e}") from None
  return url


def main() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  bundle = flags.DEFINE_string("bundle", None, "The bundle directory (python -m bigen_jax.export).", required=True)
  port = flags.DEFINE_integer("port", 7860, "The port to serve on.")
  host = flags.DEFINE_string("host", "127.0.0.1", "The address to serve on (0.0.0.0: every interface).")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import_gradio()
    check_port(host.value, port.value)
    from bigen_jax import pipeline  # pylint: disable=g-import-not-at-top
    try:
      page = build_app(pipeline.Pipeline.load(bundle.value))
      print(f"playground of {bundle.value} on {launch(page, host=host.value, port=port.value)} (Ctrl+C stops it)",
            flush=True)
      page.block_thread()  # returns on Ctrl+C, the server closed
    except KeyboardInterrupt:  # Ctrl+C while loading: no traceback
      sys.exit(130)

  cli.run(run)


if __name__ == "__main__":
  main()
