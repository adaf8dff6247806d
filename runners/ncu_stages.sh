#!/usr/bin/env bash
# Nsight Compute per stage: exact counters of the first kernels of each stage range, with the
# SpeedOfLight and roofline sections.
#   runners/ncu_stages.sh mode=base max_new_tokens=8
#   STAGES="sam prefill" LAUNCH_COUNT=10 runners/ncu_stages.sh mode=gundam
#
# One job per stage, each profiling the first $LAUNCH_COUNT (default 20) kernels launched inside
# the NVTX push/pop range llm_perf_opt@<stage> (nested stage/family ranges included); into
# $NCU_OUT (default outputs/ncu/<time>):
#   <stage>.ncu-rep   the report: open it in the Nsight Compute UI (roofline charts)
#   <stage>.csv       ncu --import <stage>.ncu-rep --csv --page raw: one row per kernel, every
#                     collected metric in base units
#   <stage>/          the job's run dir
# Counters, not times: ncu replays each kernel serialised, with clocks locked to base and caches
# flushed, so read FLOPs, bytes and % of peak here and take times from the timed runs.
set -euo pipefail
command -v ncu >/dev/null || { echo "error: ncu (Nsight Compute) is not on PATH" >&2; exit 2; }
python=${PYTHON:-python}
read -r -a stages <<<"${STAGES:-preprocess sam clip projector prefill decode}"
launch_count=${LAUNCH_COUNT:-20}
out=${NCU_OUT:-outputs/ncu/$(date +%Y-%m-%d_%H-%M-%S)}
sections=(
  --section SpeedOfLight
  --section SpeedOfLight_RooflineChart
  --section SpeedOfLight_HierarchicalTensorRooflineChart
)
mkdir -p "$out"

for stage in "${stages[@]}"; do
  echo "== $stage" >&2
  # One warm-up and one timed run are enough: the first kernels of the range are the ones profiled.
  ncu --nvtx --nvtx-include "llm_perf_opt@$stage/" "${sections[@]}" --launch-count "$launch_count" \
    --target-processes all --force-overwrite --export "$out/$stage" \
    "$python" -m llm_perf_opt.run "$@" profiling.warmup=1 profiling.repeats=1 profiling.trace=false \
    "hydra.run.dir=$out/$stage"
  if [[ -f $out/$stage.ncu-rep ]]; then
    ncu --import "$out/$stage.ncu-rep" --csv --page raw --print-units base >"$out/$stage.csv"
  else
    echo "warning: no kernel of $stage was profiled (does the range launch any?)" >&2
  fi
done
echo "$out"
