"""The training loop every trainer runs: the stage-1 trainer (``bigen_jax.train``) and the SPADE GAN's
(``bigen_jax.train_generator``) differ in their state and step functions only.

  ckpt = loop.open_run(config, workdir)                   # checkpointer; resume check; workdir/config.json
  state, start = loop.restore_or_init(ckpt, abstract, init, data)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = loop.run(config, workdir, state=state, start=start, steps=steps, cycle=cycle, data=data,
                     to_global=to_global, ckpt=ckpt, evaluate=evaluate)

``run`` owns the plumbing: the step cycle, the first call of every step kind compiled at once (``compile_ahead``),
the progress line (steps/s, ETA), clu metric writers and the ``workdir/metrics.jsonl`` history, periodic, final
and preemption (SIGTERM) checkpoints with the data-iterator position, evaluation points, the profiler trace. The
config fields it reads: total_steps, stop_at_step, log_every, batch_size, checkpoint.{every, keep, async_save,
fallback}, eval.every, profile, peak_flops_per_device.
"""

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections

from bigen_jax import checkpoint
from bigen_jax import fileio
from bigen_jax import metrics as metrics_lib
from bigen_jax import run_config

# (state, global batch) -> (state, metrics): one jitted update; metrics hold a scalar "loss" (checked finite).
# A step with a ``lower(state, batch)`` method (a ``jax.jit`` function, a ``BoundStep``) is compiled ahead.
Step = Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """A jitted ``fn(state, batch, *extra)`` with its trailing arguments bound (e.g. the frozen models): a loop
  ``Step`` that ``compile_ahead`` can lower like the jitted function itself."""
  fn: Any
  extra: tuple[Any, ...] = ()

  def __call__(self, state: Any, batch: Any) -> tuple[Any, dict[str, jax.Array]]:
    return self.fn(state, batch, *self.extra)

  def lower(self, state: Any, batch: Any) -> Any:
    return self.fn.lower(state, batch, *self.extra)


def compile_ahead(steps: Mapping[str, Step], names: Sequence[str], state: Any, batch: Any) -> None:
  """Compiles the first call of each step in ``names`` now, the XLA compiles in parallel threads: XLA compiles a
  program on one core, so a schedule of several step kinds (stage 2's SCST, CLIP-loss and cross-entropy steps)
  otherwise compiles them one after another. Tracing and lowering stay in this thread (they read its mesh and
  axis-rule contexts); ``jax.jit`` then reuses the compiled programs. Nothing runs and ``state`` is not donated."""
  lowerable = [steps[name] for name in dict.fromkeys(names) if hasattr(steps[name], "lower")]
  if len(lowerable) < 2:  # one step kind: its first call compiles it, nothing to overlap
    return
  lowered = [step.lower(state, batch) for step in lowerable]
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    list(pool.map(lambda program: program.compile(), lowered))


def open_run(config: ml_collections.ConfigDict, workdir: str) -> checkpoint.Checkpointer:
  """The run's checkpointer (``workdir/checkpoints``, ``config.checkpoint``). A resume is checked against the
  saved config first (``run_config.check_resume``); then ``config`` is saved as ``workdir/config.json``."""
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), save_every=config.checkpoint.every,
                                 keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                 fallback=config.checkpoint.get("fallback", True))
  if ckpt.latest_step() is not None:
    run_config.check_resume(config, workdir)
  run_config.save(config, workdir)
  return ckpt


def restore_or_init(ckpt: checkpoint.Checkpointer, abstract: Any, init: Callable[[], Any], data) -> tuple[Any, int]:
  """(state, its step): the newest good checkpoint restored into ``abstract``'s shapes and shardings, ``data``
  set to the position it saved; else ``init()`` at step 0."""
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(abstract)
    data.set_state(data_state)
    return state, start
  return init(), 0


def profiler(config: ml_collections.ConfigDict, workdir: str) -> periodic_actions.Profile | None:
  """A ``jax.profiler`` trace of the ``config.profile.num_steps`` steps after step ``config.profile.start_step``
  into ``workdir/plugins/profile/<time>/`` (TensorBoard's profile tab), one file per host; None when off."""
  cfg = config.get("profile")
  if not cfg or not cfg.num_steps:
    return None
  return periodic_actions.Profile(logdir=workdir, num_profile_steps=cfg.num_steps, profile_duration_ms=0,
                                  first_profile=cfg.start_step, every_steps=None, every_secs=None)


def _stop_trace() -> None:
  """Ends a trace the loop left running (the run stopped inside the profiled steps)."""
  try:
    jax.profiler.stop_trace()
  except RuntimeError:  # no trace running
    pass


def run(config: ml_collections.ConfigDict, workdir: str, *, state: Any, start: int, steps: Mapping[str, Step],
        cycle: Sequence[str], data, to_global: Callable[[dict], Any], ckpt: checkpoint.Checkpointer,
        evaluate: Callable[[Any, int], dict[str, float]] | None = None, step_flops: float = 0.0) -> Any:
  """Trains from step ``start`` to ``config.stop_at_step`` (0: ``config.total_steps``); returns the last state.

  Step ``s`` runs ``steps[cycle[s % len(cycle)]]`` on ``to_global(next(data))``; its metrics are logged as
  ``<name>/<metric>`` (``metrics.summarise``). ``evaluate(state, step) -> scalars`` runs every
  ``config.eval.every`` steps, its scalars logged as they are. ``step_flops``: model FLOPs of one step, for the
  MFU estimate (0: none). ``data`` is the input pipeline's iterator (its position is checkpointed; closed at the
  end). Call inside the mesh and axis-rules contexts; closes ``ckpt``.
  """
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(run_config.hparams(config))
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                           every_steps=config.log_every)
  history, stop = metrics_lib.History(workdir, start), checkpoint.StopSignal()
  profile = profiler(config, workdir)
  pending, summary, t_log, step = [], {}, time.time(), start
  last = min(config.stop_at_step or config.total_steps, config.total_steps)
  try:
    while step < last:
      name = cycle[step % len(cycle)]
      batch = to_global(next(data))
      if step == start:
        compile_ahead(steps, [cycle[s % len(cycle)] for s in range(start, min(last, start + len(cycle)))], state,
                      batch)
      state, metrics = steps[name](state, batch)
      pending.append((step, name, metrics))
      step += 1
      report(step)
      if profile is not None:
        profile(step)
      save_now = ckpt.manager.should_save(step) or step == last
      if step % config.log_every == 0 or save_now:
        summary = metrics_lib.summarise(pending, ckpt)
        n, pending = len({s for s, _, _ in pending}), []
        elapsed, t_log = time.time() - t_log, time.time()
        summary.update({"steps_per_sec": n / elapsed, "examples_per_sec": n * config.batch_size / elapsed})
        if config.peak_flops_per_device and step_flops:
          summary["mfu"] = step_flops * n / elapsed / (config.peak_flops_per_device * jax.device_count())
        writer.write_scalars(step, summary)
        history.write(step, summary)
        eta = (config.total_steps - step) / max(summary["steps_per_sec"], 1e-9)
        losses = "  ".join(f"{k} {v:.4f}" for k, v in sorted(summary.items()) if k.endswith("/loss"))
        print(f"[train] step {step}/{config.total_steps}  {losses}  {summary['steps_per_sec']:.2f} steps/s  "
              f"ETA {eta / 60:.1f} min", flush=True)
      ckpt.save(step, state, data.get_state(), force=step == last)
      if evaluate is not None and config.eval.every and step % config.eval.every == 0:
        results = evaluate(state, step)
        writer.write_scalars(step, results)
        history.write(step, results)
      if stop.should_stop(step):
        metrics_lib.summarise(pending, ckpt)
        if ckpt.latest_step() != step:
          ckpt.save(step, state, data.get_state(), force=True)
        logging.warning("stopped by signal at step %d; checkpoint written", step)
        break
  finally:
    if profile is not None:
      _stop_trace()
    ckpt.close()
    writer.flush()
    stop.restore_handlers()
    data.close()
  return state
