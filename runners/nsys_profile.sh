#!/usr/bin/env bash
# Nsight Systems capture of one job, then the per-stage kernel summaries.
#   runners/nsys_profile.sh mode=base max_new_tokens=16
# Ranges are NVTX push/pop ranges in the llm_perf_opt domain; nvtx_kern_sum lists each kernel
# under every enclosing range, so read the innermost ones (e.g. prefill/moe) for exclusive time.
set -euo pipefail
command -v nsys >/dev/null || { echo "error: nsys (Nsight Systems) is not on PATH" >&2; exit 2; }
out="outputs/nsys/$(date +%Y-%m-%d_%H-%M-%S)"
mkdir -p "$out"
# The torch.profiler pass is switched off: two profilers in one process distort each other.
nsys profile --trace=cuda,nvtx,osrt --cuda-graph-trace=node --force-overwrite=true -o "$out/capture" \
  python -m llm_perf_opt.run "$@" profiling.trace=false hydra.run.dir="$out/run"
for report in nvtx_sum nvtx_kern_sum nvtx_gpu_proj_sum cuda_gpu_kern_sum; do
  nsys stats --force-export=true --report "$report" --format csv --output "$out/$report" "$out/capture.nsys-rep" \
    || echo "warning: nsys stats could not produce $report (report names change between versions)" >&2
done
echo "$out"
