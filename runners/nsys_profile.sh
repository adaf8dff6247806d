#!/usr/bin/env bash
# Nsight Systems capture of one job, its nsys stats CSVs, and the job's report rebuilt from them.
#   runners/nsys_profile.sh mode=base max_new_tokens=16
#   NSYS_OUT=outputs/nsys/base runners/nsys_profile.sh mode=base
#
# Everything lands in one run dir ($NSYS_OUT, default outputs/nsys/<time>):
#   capture.nsys-rep        the capture: open it in the Nsight Systems UI (NVTX domain llm_perf_opt)
#   nsys_<report>.csv       nsys stats nvtx_sum, cuda_gpu_kern_sum, nvtx_kern_sum, nvtx_gpu_proj_sum
#   run.json, stages.csv, kernels.csv, stages.json, report.md, roofline.png
#                           the job's artifacts, busy times and kernels taken from the CSVs by
#                           python -m llm_perf_opt.report --from-nsys (trace.basis "device (nsys)")
# The torch.profiler pass is off: two profilers in one process distort each other. Kernels
# replayed from CUDA graphs get one row each with --cuda-graph-trace=node. Only the timed runs
# are captured (--capture-range=cudaProfilerApi: the harness starts the range after the warm-up,
# so path tuning, calibration and warm-up are left out). The job's timings (TTFT, TPOT, stage
# wall times) are still taken under nsys, with per-node graph tracing: compare them only with
# other nsys captures, never with an unprofiled run.
set -euo pipefail
command -v nsys >/dev/null || { echo "error: nsys (Nsight Systems) is not on PATH" >&2; exit 2; }
python=${PYTHON:-python}
out=${NSYS_OUT:-outputs/nsys/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$out"

nsys profile --trace=cuda,nvtx,osrt --cuda-graph-trace=node --capture-range=cudaProfilerApi \
  --capture-range-end=stop --force-overwrite=true --output "$out/capture" \
  "$python" -m llm_perf_opt.run "$@" profiling.trace=false "hydra.run.dir=$out"

# Report names change between nsys versions; older ones call nvtx_sum nvtx_pushpop_sum and lack
# nvtx_gpu_proj_sum (optional for the import).
if ! nsys stats -f csv --force-export=true -r nvtx_sum,cuda_gpu_kern_sum,nvtx_kern_sum,nvtx_gpu_proj_sum \
  -o "$out/nsys" "$out/capture.nsys-rep"; then
  echo "warning: retrying with the report names of older nsys versions" >&2
  nsys stats -f csv --force-export=true -r nvtx_pushpop_sum,cuda_gpu_kern_sum,nvtx_kern_sum \
    -o "$out/nsys" "$out/capture.nsys-rep"
fi

"$python" -m llm_perf_opt.report --from-nsys "$out"
echo "timings in $out were taken under nsys (per-node CUDA-graph tracing): compare them only with other nsys captures"
echo "$out"
