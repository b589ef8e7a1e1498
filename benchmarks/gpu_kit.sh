#!/usr/bin/env bash
# The issue-8 GPU figures in one short, prepared run on a lent machine with no package registry.
#
#   bash benchmarks/gpu_kit.sh fetch            # here, with the network: wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu_kit.sh run [NAME ...]   # there, from the repository root, with .whl carried
#
# The device image (see ../.library/device/KINDS.md) has jax 0.11.2 with CUDA, flax, optax, orbax,
# tensorstore, sentencepiece, rich, typer and pyyaml, but not pydantic (indicfm's config schema), nor
# tokamax (the grouped-matmul kernel `grouped_matmul: auto` uses on GPU) and the four small packages
# tokamax needs that the image lacks.  `fetch` downloads exactly those, for the image's Python 3.12.
# tokamax imports `xprof.cli.tools.get_kernel_stats_tool` (a profiler UI) for its own benchmarking
# helpers only: `run` puts a stand-in module on the path that raises if it is ever called.
#
# `run` installs them without an index, then runs each benchmark (default: attention, moe, step) as
# its own `benchmarks.run --only peak --only NAME` with a time limit, writing $OUT/gpu_NAME.json (or
# ./gpu_NAME.json without $OUT), so a benchmark cut off by its limit loses only its own figures.
# Budget: a lent machine gives a session 15 minutes in all and one command 10; the limits below
# (GPU_KIT_LIMIT_S each, default 170 s) keep the three inside one command.  `step` prints each
# case's figures as it finishes ("[step] case: {...}" on stderr), so a step run cut off by its limit
# still reports the cases it measured; `run step` alone with GPU_KIT_LIMIT_S=540 measures all six.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PY=${PYTHON:-python3}

fetch() {
  mkdir -p "$WHEELS"
  local args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
              -d "$WHEELS")
  "$PY" -m pip download "${args[@]}" "pydantic>=2.11" annotated-types typing-inspection typing-extensions \
    tokamax einshape qwix immutabledict tensorboardx
  # pydantic pins the pydantic-core it was built against: fetch that exact one
  "$PY" -m pip download "${args[@]}" "$(unzip -p "$WHEELS"/pydantic-2*.whl '*/METADATA' \
    | sed -n 's/^Requires-Dist: \(pydantic-core==[0-9.]*\).*/\1/p')"
  ls -l "$WHEELS"
}

run() {
  local out=${OUT:-.} limit=${GPU_KIT_LIMIT_S:-170}
  "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
  local stub; stub=$(mktemp -d)
  mkdir -p "$stub/xprof/cli" && touch "$stub/xprof/__init__.py" "$stub/xprof/cli/__init__.py"
  printf 'def get_kernel_stats_tool(*args, **kwargs):\n    raise RuntimeError("xprof stand-in (benchmarks/gpu_kit.sh)")\n' \
    >"$stub/xprof/cli/tools.py"
  # indicfm's packages are imported from this checkout (no install: nothing else is needed)
  export PYTHONPATH="$PWD:$stub${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import jax, tokamax; print('jax', jax.__version__, jax.devices())"
  local names=("$@")
  [ ${#names[@]} -gt 0 ] || names=(attention moe step)
  for name in "${names[@]}"; do
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$PY" -m benchmarks.run --only peak --only "$name" --output "$out/gpu_$name.json" \
      || echo "== $name stopped (exit $?)"
  done
}

case "${1:-}" in
  fetch) fetch ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 fetch | run [NAME ...]" >&2; exit 2 ;;
esac
