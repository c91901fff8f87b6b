#!/usr/bin/env bash
# Check dgemma on one device (cuda, mps, cpu) with one command: the parity tests against transformers, the sampler's
# statistical tests, the engine's batch-invariance tests and the quantised weights' tests, run on that device; then a
# short bench, the serving bench (8 concurrent clients against the same 8 requests one after another, a real
# `dgemma serve` on that device), a training run (configs/quickstart.toml) and generation from an int4 GGUF of the
# bundled model there.
# Prints one summary line at the end. Usage: scripts/device_check.sh cuda [OUT_DIR]
set -uo pipefail
DEVICE="${1:?usage: scripts/device_check.sh DEVICE [OUT_DIR]}"
OUT="${2:-${OUT:-device-check}}"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$OUT"
echo "device check on $DEVICE ($("$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "")'))"

start=$(date +%s)
DGEMMA_TEST_DEVICES="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_generation_parity.py tests/test_engine.py tests/test_model_parity.py tests/test_sampling.py \
    tests/test_quantized.py \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_status=$?
tests_line=$(tail -n 1 "$OUT/tests.log")

"$PYTHON" -m dgemma bench --config small --vocab 32768 --device "$DEVICE" --repeat 1 --steps 8 \
    --systems dgemma-fast,transformers --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
bench_status=$?
ratio=$("$PYTHON" -c "import json; r = json.load(open('$OUT/bench.json')); s = r['summary']; \
print(f\"fast {s['dgemma-fast']['tokens_per_second']['median']:.1f} tok/s, transformers \
{s['transformers']['tokens_per_second']['median']:.1f} tok/s, {r['ratios']['dgemma-fast / transformers']:.2f}x\")" \
    2>/dev/null || echo "bench failed (see $OUT/bench.log)")

"$PYTHON" -m dgemma bench --serving --device "$DEVICE" --repeat 2 --clients 8 --max-new-tokens 64 \
    --out "$OUT/serving.json" > "$OUT/serving.log" 2>&1
serving_status=$?
serving=$("$PYTHON" -c "import json; r = json.load(open('$OUT/serving.json')); s = r['summary']; \
print(f\"one after another {s['sequential']['tokens_per_second']['median']:.1f} tok/s, all at once \
{s['concurrent']['tokens_per_second']['median']:.1f} tok/s, {r['ratio']:.2f}x\")" \
    2>/dev/null || echo "serving bench failed (see $OUT/serving.log)")

"$PYTHON" -m dgemma train --config configs/quickstart.toml --device "$DEVICE" --overwrite > "$OUT/train.log" 2>&1
train_status=$?
cp runs/quickstart/log.jsonl "$OUT/train.jsonl" 2>/dev/null
trained=$("$PYTHON" -c "import json; r = [json.loads(l) for l in open('$OUT/train.jsonl')]; \
e = [x for x in r if 'eval_diffusion_loss' in x]; \
print(f\"loss {r[0]['loss']:.2f} -> {r[-1]['loss']:.2f} in {r[-1]['step']} steps, held-out diffusion \
{e[0]['eval_diffusion_loss']:.2f} -> {e[-1]['eval_diffusion_loss']:.2f}\")" 2>/dev/null || echo "training failed (see $OUT/train.log)")

"$PYTHON" -m dgemma quantize dgemma/bundled "$OUT/bundled-int4.gguf" --scheme int4 > "$OUT/quantized.log" 2>&1 \
    && "$PYTHON" -m dgemma generate --model "$OUT/bundled-int4.gguf" --device "$DEVICE" --seed 0 --stats \
        "It is a truth universally acknowledged" >> "$OUT/quantized.log" 2>&1
quantized_status=$?
rm -f "$OUT/bundled-int4.gguf"

echo "device_check $DEVICE: tests [$tests_line] exit $tests_status; bench [$ratio] exit $bench_status;" \
     "serving [$serving] exit $serving_status; train [$trained] exit $train_status;" \
     "int4 GGUF generate exit $quantized_status; $(( $(date +%s) - start )) s"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$serving_status" -eq 0 ] \
    && [ "$train_status" -eq 0 ] && [ "$quantized_status" -eq 0 ]
