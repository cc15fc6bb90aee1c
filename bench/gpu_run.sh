#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the `gpu` tests and the benchmarks, and
# write every log and JSON under OUTDIR (copy it to bench/results/<card>/ afterwards).
#   bench/gpu_run.sh OUTDIR [build] [tests] [tune] [kernels] [decode] [host] [e2e] [e2e-eager] [fp8]
#   (no stage named: build tests kernels decode host e2e. tune: bench.tune_triton merges winners into
#   OUTDIR/tuned_attention.json and copies it to kernels/ so later stages use it; commit it.
#   e2e-eager: the continuous-policy e2e run without CUDA graphs, and without async
#   scheduling, for A/B. fp8: the continuous e2e run with kv_cache_dtype=fp8_e4m3, and
#   bench.fp8_accuracy in bf16 on the device)
# Stages keep to a few minutes each so a 10-minute command limit can hold one or two.
# At the end everything is packed into OUTDIR/results-<stages>.tar.gz (one file: a result
# folder of many logs, JSON and PNGs is easier to carry back whole); RAGGED_PACK=0 keeps
# the files loose.
set -uo pipefail
out=${1:?usage: bench/gpu_run.sh OUTDIR [build] [tests] [tune] [kernels] [decode] [host] [e2e] [e2e-eager]}
shift
stages=${*:-build tests kernels decode host e2e}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
run() {  # run NAME CMD...: log to OUTDIR/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"; tail -n 15 "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
for s in $stages; do
  case $s in
    build)   run build env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS=16 \
                 python3 -m pip install -e . --no-build-isolation --no-deps ;;
    tests)   run gpu-tests python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
    kernels) run bench-kernels python3 -m bench.kernels --device cuda --out "$out" ;;
    tune)    [ -f kernels/tuned_attention.json ] && cp kernels/tuned_attention.json "$out/"
             run tune python3 -m bench.tune_triton --write --table "$out/tuned_attention.json" --out "$out"
             [ -f "$out/tuned_attention.json" ] && cp "$out/tuned_attention.json" kernels/ ;;
    decode)  run bench-decode python3 -m bench.decode_step --device cuda --out "$out" ;;
    host)    run host-overhead python3 -m bench.host_overhead --device cuda --out-dir "$out"
             run host-overhead-graphs python3 -m bench.host_overhead --device cuda --graphs \
                 --max-model-len 8192 --out-dir "$out" ;;
    e2e)     run bench-e2e python3 -m bench.e2e --device cuda --out "$out" ;;
    e2e-eager) mkdir -p "$out/eager" "$out/sync"
             run bench-e2e-eager python3 -m bench.e2e --device cuda --no-cuda-graphs \
                 --systems ragged --policies continuous --out "$out/eager"
             run bench-e2e-sync python3 -m bench.e2e --device cuda --no-async-scheduling \
                 --systems ragged --policies continuous --out "$out/sync" ;;
    fp8)     mkdir -p "$out/fp8"   # fp8 KV cache: e2e beside the bf16 e2e stage, accuracy
             run bench-e2e-fp8 python3 -m bench.e2e --device cuda --kv-cache-dtype fp8_e4m3 \
                 --systems ragged --policies continuous --out "$out/fp8"
             run fp8-accuracy python3 -m bench.fp8_accuracy --device cuda --dtype bfloat16 \
                 --out "$out/fp8" ;;
    *) echo "unknown stage $s"; status=2 ;;
  esac
done
if [ "${RAGGED_PACK:-1}" = 1 ]; then
  tarball="results-$(echo $stages | tr ' ' '-').tar.gz"
  (cd "$out" && find . -mindepth 1 -maxdepth 1 ! -name 'results-*.tar.gz' -printf '%P\n' \
     | tar -czf "$tarball" -T - && find . -mindepth 1 -maxdepth 1 ! -name 'results-*.tar.gz' \
     -exec rm -rf {} +)
  echo "packed: $out/$tarball"
fi
exit $status
