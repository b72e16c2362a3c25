#!/usr/bin/env bash
# vedrt's GPU check, in one command, on a machine with an NVIDIA GPU and torch (CUDA):
#   1. the GPU tests (pytest -m gpu: torch executor eager/CUDA graphs/fp16, ORT CUDA, TensorRT);
#   2. the benchmark harness on --device cuda (transformers generate fp32 on CUDA vs vedrt's torch
#      executor fp32/fp16 with CUDA graphs, ORT CUDA and TensorRT where present).
# Results go to benchmarks/results/gpu-<timestamp>/ and, if $OUT is set, are copied there too.
#
# It installs nothing. If the machine's transformers is not 4.57 (vedrt pins it: generate()'s
# beam search changed in 5.x), put the pinned wheels in .whl/ at the repo root (see docs/gpu.md):
# they are unpacked once into .whl/site/ and put first on PYTHONPATH.
# TensorRT parts are skipped, with a line saying so, where `import tensorrt` fails.
#
# Environment: PYTHON (default python3), BENCH_ARGS (harness arguments; default: the targets'
# setting "--models vit-gpt2,scenes --batch 1 --beams 4 --new-tokens 16"), PYTEST_ARGS.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
STAMP="$(date +%Y%m%d-%H%M%S)"
RESULTS="$REPO/benchmarks/results/gpu-$STAMP"
mkdir -p "$RESULTS"
LOG="$RESULTS/suite.log"
say() { echo "gpu_suite: $*" | tee -a "$LOG"; }

# --- pinned pure-Python (and abi3) wheels first on the path, if provided ----------------------
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  SITE="$REPO/.whl/site"
  STAMP_FILE="$SITE/.unpacked"
  if [ ! -f "$STAMP_FILE" ] || [ -n "$(find "$REPO/.whl" -maxdepth 1 -name '*.whl' -newer "$STAMP_FILE")" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE"
    for whl in "$REPO"/.whl/*.whl; do
      "$PY" -m zipfile -e "$whl" "$SITE" || { say "cannot unpack $whl"; exit 1; }
    done
    touch "$STAMP_FILE"
  fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  say "using the wheels in .whl/ (unpacked in $SITE) first on PYTHONPATH"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- what this machine has -------------------------------------------------------------------
"$PY" - <<'PYEOF' 2>&1 | tee "$RESULTS/environment.txt" | tee -a "$LOG"
import importlib, platform, sys
print("python", platform.python_version())
for name in ("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "tensorrt", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name:13s}", getattr(module, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - report whatever stops the import
        print(f"{name:13s} MISSING ({type(exc).__name__}: {str(exc)[:80]})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import onnxruntime as ort
    print("ort providers", ort.get_available_providers())
except Exception:
    pass
PYEOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA GPU visible to torch: nothing to check here"; exit 2
fi
if ! "$PY" -c "import transformers, sys; sys.exit(0 if transformers.__version__.startswith('4.57') else 1)"; then
  say "WARNING: transformers is not 4.57: parity tests compare against another generate(); see docs/gpu.md (.whl/)"
fi
if "$PY" -c "import tensorrt" 2>/dev/null; then
  say "TensorRT present: engines are built and tested"
else
  say "TensorRT absent: skipping the TensorRT tests and benchmarks (vedrt-trt-* show as skipped)"
fi

# --- 1. GPU tests ------------------------------------------------------------------------------
say "pytest -m gpu ..."
# shellcheck disable=SC2086
"$PY" -m pytest -m gpu -q -rs --junitxml="$RESULTS/pytest-gpu.xml" ${PYTEST_ARGS:-} tests 2>&1 \
  | tee "$RESULTS/pytest-gpu.txt" | tail -n 30
TESTS_RC=${PIPESTATUS[0]}
say "GPU tests exit code $TESTS_RC"

# --- 2. the harness on the GPU backends ---------------------------------------------------------
BENCH_RC=0
if "$PY" -c "import benchmarks.__main__" 2>/dev/null || [ -f "$REPO/benchmarks/__main__.py" ]; then
  HELP="$("$PY" -m benchmarks --help 2>&1 || true)"
  ARGS=(--device cuda)
  for flag in --out --out-dir --results; do
    if grep -q -- "$flag" <<<"$HELP"; then ARGS+=("$flag" "$RESULTS"); break; fi
  done
  BENCH_ARGS="${BENCH_ARGS:---models vit-gpt2,scenes --batch 1 --beams 4 --new-tokens 16}"
  say "python -m benchmarks ${ARGS[*]} $BENCH_ARGS"
  # shellcheck disable=SC2086
  "$PY" -m benchmarks "${ARGS[@]}" $BENCH_ARGS 2>&1 | tee "$RESULTS/bench.txt" | tail -n 60
  BENCH_RC=${PIPESTATUS[0]}
  # a harness without an output flag writes under benchmarks/results/: gather what it wrote
  find "$REPO/benchmarks/results" -maxdepth 1 -type f -newer "$LOG" -exec cp {} "$RESULTS/" \; 2>/dev/null
  say "benchmarks exit code $BENCH_RC"
else
  say "benchmarks/__main__.py not found: the harness is not part of this checkout, skipping it"
fi

# --- results -----------------------------------------------------------------------------------
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/gpu-suite"
  cp -r "$RESULTS"/. "$OUT/gpu-suite/"
  say "results copied to $OUT/gpu-suite"
fi
say "results in $RESULTS"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
