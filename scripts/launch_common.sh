# Sourced by the launchers in scripts/ (launch_multigpu.sh, launch_tpu_pod.sh, prepare_coco_sharded.sh), not run:
# the checkout's root ($repo), its Python ($PYTHON: the environment's, else .venv/bin/python of the checkout, else
# python3), the usage message and the DRY_RUN-aware runners.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x "$repo/.venv/bin/python" ]] && PYTHON="$repo/.venv/bin/python"
fi

# The calling script's header comment (its lines 2 up to `set -euo`) on stderr; exit status 2.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# Runs a command in the checkout's root and returns; DRY_RUN=1 prints it instead (one argument a line).
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "$@" ""
  else
    (cd "$repo" && "$@")
  fi
}

# As run, but the command replaces the shell, so that a scheduler's signals (SIGTERM) reach it directly.
run_exec() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "$@" ""
  else
    cd "$repo"
    exec "$@"
  fi
}
