#!/usr/bin/env bash
# GPU first light: the most evidence from one lent H100/H200 command (~8 minutes), and a cut
# run still returns everything done so far.
#
#   bench/first_light.sh OUTDIR                 # the first command (internal budget ~465 s)
#   bench/first_light.sh --rest OUTDIR          # the second command (~180 s): the rest of the
#                                               #   gpu suite in parallel (pytest -n 8)
#   bench/first_light.sh --rest --failed FILE OUTDIR   # only those test ids, --tb=long
#   bench/first_light.sh --extra OUTDIR         # a later session's A/B stages (~8 min): offline
#                                               #   Triton tuning, e2e without CUDA graphs / async
#                                               #   scheduling, host overhead, flex baselines
#   bench/first_light.sh --dry-run OUTDIR       # CPU analogue of every stage, in seconds (CI)
#
# Run from the repo root. Stages (first command), each under `timeout -s INT` set to
# min(its cap, budget left) -- pytest still prints its summary and junit XML on SIGINT -- and
# skipped with a note when less than MIN_STAGE_S is left:
#   probe         card, driver, versions, SM count, clocks; the CUDA extension starts building
#                 in the background (in place, sm_90a only, MAX_JOBS=12)
#   triton-smoke  bf16 smoke tests of the Triton backend on Llama-3-8B shapes (bench/first_light_triton.txt)
#   cuda-smoke    the same for the CUDA backend (bench/first_light_cuda.txt), after the build
#   kernels       bench.kernels at full shapes, no flex_attention (its compiles cost minutes)
#   decode        bench.decode_step at batch 1/32/256, both backends
#   e2e           llama3-8b random weights straight onto the GPU; Anyscale workload, 256
#                 requests x 512-token prompts, cap 512; continuous then static, then HF static
#                 generate on a 32-request subset (its own random weights: a throughput
#                 baseline only, recorded so in the JSON)
# After every stage OUTDIR/results.tgz is re-packed (all logs, JSON, junit XML) and
# OUTDIR/summary.txt appended, so OUTDIR never holds more than 3 files (results.tgz,
# summary.txt, failed.txt): the device tool returns at most 8.
# Environment: FIRST_LIGHT_BUDGET_S (default 465; --rest 180), MIN_STAGE_S (default 20).
# Optional carried Triton cache (skips the smoke kernels' JIT compiles; bench/NOTES.md,
# "Carried Triton cache"): build it on the CPU machine with `python -m bench.triton_cache`
# (4-7 min on 2 shared cores, ~6 MiB, into .triton_cache/, git-ignored) and carry it with the
# device tool's carry=[".triton_cache"]; the probe copies it to /tmp/ragged-triton-cache and
# the summary's "triton cache:" lines after triton-smoke give the kernels compiled anyway and
# how many carried kernels were hit (their group file read since the copy). The carry covers
# 18 of the smoke set's 20 tests, not its 2 engine tests (they compile as before).
# Any kernel edit after the build makes its entries miss (harmless: compiled as without one).
set -uo pipefail

dry=0 mode=first failed="" out=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --rest) mode=rest; shift ;;
    --extra) mode=extra; shift ;;
    --failed) failed=${2:?--failed needs a file}; shift 2 ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    -*) echo "first_light: unknown option $1" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
[ -n "$out" ] || { echo "usage: bench/first_light.sh [--dry-run] [--rest [--failed FILE] | --extra] OUTDIR" >&2; exit 2; }
[ -f bench/first_light.sh ] || { echo "first_light: run from the repo root" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/first_light.XXXXXX")
mkdir -p "$work/logs" "$work/json"
case $mode in rest) budget=${FIRST_LIGHT_BUDGET_S:-180} ;; *) budget=${FIRST_LIGHT_BUDGET_S:-465} ;; esac
min_stage=${MIN_STAGE_S:-20}
t_start=$SECONDS
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
summary="$work/summary.txt"
: > "$summary"

note() { echo "$*" | tee -a "$summary"; }
left() { echo $(( budget - (SECONDS - t_start) )); }

pack() {   # everything so far into OUTDIR/results.tgz; summary (and failed ids) beside it
  cp "$summary" "$out/summary.txt"
  [ -s "$work/failed.txt" ] && cp "$work/failed.txt" "$out/failed.txt"
  tar -czf "$out/results.tgz.tmp" -C "$work" . 2>/dev/null && mv "$out/results.tgz.tmp" "$out/results.tgz"
}

collect_failed() {   # failed/errored test ids of a junit XML -> work/failed.txt
  "$py" - "$1" >> "$work/failed.txt" <<'EOF' || true
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    sys.exit(0)
for tc in root.iter("testcase"):
    if tc.find("failure") is not None or tc.find("error") is not None:
        path = tc.get("file") or tc.get("classname", "").replace(".", "/") + ".py"
        print(f"{path}::{tc.get('name')}")
EOF
}

stage() {  # stage NAME CAP_S CMD...: run under min(cap, budget left); log; summary; pack
  local name=$1 cap=$2; shift 2
  local l; l=$(left)
  local t=$(( cap < l ? cap : l ))
  if [ "$t" -lt "$min_stage" ]; then
    note "[$name] SKIPPED: ${l}s of the ${budget}s budget left (< ${min_stage}s)"
    pack; return 0
  fi
  local t0=$SECONDS
  timeout -s INT -k 15 "$t" "$@" > "$work/logs/$name.log" 2>&1
  local rc=$?
  local why=""
  [ $rc -eq 124 ] || [ $rc -eq 130 ] && why=" (cut at ${t}s)"
  note "[$name] rc=$rc in $(( SECONDS - t0 ))s, cap ${t}s$why: $*"
  # pytest's closing line, or the log's last line
  local last; last=$(grep -E "(passed|failed|error|no tests ran)" "$work/logs/$name.log" | tail -n 1)
  [ -n "$last" ] || last=$(tail -n 1 "$work/logs/$name.log")
  note "    ${last:0:300}"
  [ -f "$work/json/$name.xml" ] && collect_failed "$work/json/$name.xml"
  pack
  return 0
}

ids() {  # test ids of a smoke list (comments and blanks dropped)
  grep -v '^\s*#' "$1" | sed '/^\s*$/d'
}

smoke() {  # smoke NAME LIST: the listed gpu tests (dry run: check every id exists)
  local name=$1 list=$2
  # shellcheck disable=SC2046
  if [ $dry = 1 ]; then
    stage "$name" 120 "$py" -m pytest --collect-only -q -p no:cacheprovider $(ids "$list")
  else
    stage "$name" "$3" "$py" -m pytest -q -m gpu -p no:cacheprovider --tb=short --maxfail=10 \
      --junitxml="$work/json/$name.xml" $(ids "$list")
  fi
}

# ------------------------------------------------------------------------------- probe
note "first_light mode=$mode dry_run=$dry budget=${budget}s commit=$(git rev-parse --short HEAD 2>/dev/null || echo none) $(date -u +%FT%TZ)"
{
  echo "## host"; uname -a; nproc; free -g 2>/dev/null | head -2
  echo "## gpu"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
    --format=csv 2>&1 || echo "no nvidia-smi"
  echo "## versions"
  "$py" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
    # a carried cache (bench/triton_cache.py) misses if any of these differ from its build's
    import os
    from triton._C.libtriton import get_cache_invalidating_env_vars
    print("triton cache-key env", get_cache_invalidating_env_vars(),
          {k: v for k, v in os.environ.items() if k.startswith("TRITON_")})
except Exception as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "mem_GiB", round(p.total_memory / 2**30, 1))
else:
    print("device: none (CPU)")
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} > "$work/logs/probe.log" 2>&1
note "    $(grep -E '^device' "$work/logs/probe.log" | head -n 1)"

# Triton cache carried from CPU (bench/triton_cache.py); kernels added by the Triton stage
# are misses (one __grp__*.json group file per compiled kernel).
cache_dir=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [ -d .triton_cache ] && [ $dry = 0 ]; then
  cache_dir=/tmp/ragged-triton-cache       # the absolute path the cache was built under
  mkdir -p "$cache_dir" && cp -r .triton_cache/. "$cache_dir/"
  export TRITON_CACHE_DIR=$cache_dir
  note "    triton cache: carried, $(find "$cache_dir" -name '__grp__*.json' | wc -l) kernels"
fi
count_cache() { find "$cache_dir" -name '__grp__*.json' 2>/dev/null | wc -l; }
carried_read() {   # carried kernels Triton looked up since the copy: group file atime > mtime
  case ,$(findmnt -no OPTIONS -T "$cache_dir" 2>/dev/null), in
    *,noatime,*) echo "unknown (noatime mount)"; return ;;
  esac
  "$py" - "$cache_dir" <<'EOF' 2>&1
import os, pathlib, sys
src, dst = pathlib.Path(".triton_cache"), pathlib.Path(sys.argv[1])
grp = [dst / p.relative_to(src) for p in src.glob("*/__grp__*.json")]
read = sum(os.stat(p).st_atime_ns > os.stat(p).st_mtime_ns for p in grp)
print(f"{read} of {len(grp)} (atime)")
EOF
}

build_pid=""
if [ $dry = 0 ]; then
  ( TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=12 timeout 420 "$py" setup.py build_ext --inplace \
      > "$work/logs/build.log" 2>&1; echo $? > "$work/build.rc" ) &
  build_pid=$!
else
  echo 0 > "$work/build.rc"; echo "dry run: no CUDA build" > "$work/logs/build.log"
fi
pack

wait_build() {   # wait for the background build, bounded by the budget
  [ -n "$build_pid" ] || return 0
  while [ ! -f "$work/build.rc" ] && [ "$(left)" -gt "$min_stage" ]; do sleep 2; done
  note "[build] rc=$(cat "$work/build.rc" 2>/dev/null || echo 'still running') at $(( SECONDS - t_start ))s"
  note "    $(tail -n 1 "$work/logs/build.log")"
}

# ------------------------------------------------------------------------------- rest
if [ "$mode" = rest ]; then
  wait_build
  if [ -n "$failed" ]; then
    # shellcheck disable=SC2046
    stage rerun-failed "$budget" "$py" -m pytest -q -p no:cacheprovider --tb=long \
      --timeout 120 --junitxml="$work/json/rerun-failed.xml" $(ids "$failed")
  elif [ $dry = 1 ]; then
    stage gpu-suite 60 "$py" -m pytest --collect-only -q -p no:cacheprovider -m gpu tests
  else
    stage gpu-suite "$budget" "$py" -m pytest -q -m gpu -p no:cacheprovider -n 8 --timeout 120 \
      --tb=short --junitxml="$work/json/gpu-suite.xml" tests
  fi
  note "done in $(( SECONDS - t_start ))s"
  pack
  rm -rf "$work"
  exit 0
fi

# ------------------------------------------------------------------------------- extra
if [ "$mode" = extra ]; then
  wait_build
  if [ $dry = 1 ]; then
    stage host 60 "$py" -m bench.host_overhead --device cpu --num-seqs 16 --steps 5 --out-dir "$work/json"
  else
    [ -f kernels/tuned_attention.json ] && cp kernels/tuned_attention.json "$work/json/"
    stage tune 150 "$py" -m bench.tune_triton --write --table "$work/json/tuned_attention.json" --out "$work/json"
    stage e2e-eager 100 "$py" -m bench.e2e --device cuda --no-cuda-graphs --systems ragged \
      --policies continuous --repeats 1 --no-plots --out "$work/json"
    stage e2e-sync 100 "$py" -m bench.e2e --device cuda --no-async-scheduling --systems ragged \
      --policies continuous --repeats 1 --no-plots --out "$work/json"
    stage host 40 "$py" -m bench.host_overhead --device cuda --graphs --max-model-len 8192 --out-dir "$work/json"
    stage kernels-flex 120 "$py" -m bench.kernels --device cuda --skip ops --out "$work/json"
    stage e2e-fp8 100 "$py" -m bench.e2e --device cuda --kv-cache-dtype fp8_e4m3 --systems ragged \
      --policies continuous --repeats 1 --no-plots --out "$work/json"
    stage fp8-accuracy 60 "$py" -m bench.fp8_accuracy --device cuda --dtype bfloat16 --out "$work/json"
  fi
  note "done in $(( SECONDS - t_start ))s"
  pack
  rm -rf "$work"
  exit 0
fi

# ------------------------------------------------------------------------------- first
before=$(count_cache)
smoke triton-smoke bench/first_light_triton.txt 100
note "    triton cache: $(( $(count_cache) - before )) kernels compiled in triton-smoke ($cache_dir)"
[ -d .triton_cache ] && [ $dry = 0 ] && note "    triton cache: carried kernels hit: $(carried_read)"
wait_build
smoke cuda-smoke bench/first_light_cuda.txt 80

if [ $dry = 1 ]; then
  stage kernels 60 "$py" -m bench.kernels --device cpu --quick --backends torch --no-flex --out "$work/json"
  stage decode 60 "$py" -m bench.decode_step --device cpu --batch 1,4 --context 32 --backends torch --out "$work/json"
  stage e2e 120 "$py" -m bench.e2e --device cpu --quick --policies continuous,static \
    --systems ragged,hf_static --hf-own-weights --repeats 1 --no-plots --out "$work/json"
else
  stage kernels 110 "$py" -m bench.kernels --device cuda --no-flex --out "$work/json"
  stage decode 50 "$py" -m bench.decode_step --device cuda --batch 1,32,256 --backends triton,cuda --out "$work/json"
  stage e2e 170 "$py" -m bench.e2e --device cuda --model llama3-8b --workload anyscale \
    --num-requests 256 --prompt-len 512 --cap 512 --max-num-seqs 64 --policies continuous,static \
    --systems ragged,hf_static --hf-max-requests 32 --hf-batch-size 32 --hf-own-weights \
    --repeats 1 --no-plots --out "$work/json"
fi
note "done in $(( SECONDS - t_start ))s of ${budget}s"
pack
[ -n "$build_pid" ] && kill "$build_pid" 2>/dev/null
rm -rf "$work"
exit 0
