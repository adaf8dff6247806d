#!/usr/bin/env bash
# The nightly performance check: sweep every mode, compare with this machine's stored baseline.
#   runners/nightly.sh cpu                  # tiny model, every mode, on the CPU (CI's CPU job, make nightly)
#   runners/nightly.sh gpu                  # full model, every mode, on the GPU (CI's self-hosted GPU job)
#   runners/nightly.sh cpu --hardware-key   # only print the key that names this machine's baseline
#
# It runs the sweep $NIGHTLY_RUNS times (default 10 on a CPU, 3 on a GPU), each its own process:
# processes of identical code differ by about 10 % as a whole on the 2-core VMs, so one process
# cannot show a 20 % regression; the centre of ten against a baseline of ten can
# (benchmarks/compare_noise.py, figures in the README). A baseline holds the runs of one such
# nightly.
#
# Writes into $NIGHTLY_OUT (default outputs/nightly/<kind>-<UTC time>):
#   run_<ii>/<n>_<model>_<mode>/ each sweep's job dirs (hydra.sweep.dir; run_01, run_02, ...)
#   comparison.md                the comparison of the runs with those of $NIGHTLY_BASELINES/<hardware>/
#                                (CI's job summary)
#   baseline-candidate/<hardware>/run_<ii>/  the sweeps as a baseline holds them (run.json, stages.csv,
#                                stages.json, .hydra/overrides.yaml per job; no trace.json)
# <hardware> is, on a CPU, cpu-<model name>-f<family>-m<model>-<cores>c-<widest ISA>-<bf16|no-bf16>
# (python -m llm_perf_opt.hardware.machine_key); on a GPU, the datasheet key of the GPU
# (conf/hardware/<key>.yaml), or gpu-<device name> for an unknown GPU.
# $NIGHTLY_BASELINES defaults to benchmarks/baselines; see its README.md for refreshing one.
#
# Exit status: compare's (0 no regression, 1 a regression or a job lost since the baseline,
# 2 not comparable), or the sweep's when that is worse. Without a baseline for this hardware:
# the sweep's status (0 when every job finished), after saying so in comparison.md.
set -euo pipefail

usage() {
  echo "usage: $0 cpu|gpu [--hardware-key]" >&2
  exit 2
}

[[ $# -ge 1 && $# -le 2 ]] || usage
kind=$1
[[ $# -eq 1 || $2 == --hardware-key ]] || usage
python=${PYTHON:-python}
modes=tiny,small,base,large,gundam
case "$kind" in
  cpu) overrides=(model=deepseek_ocr_tiny device=cpu) runs=${NIGHTLY_RUNS:-10} ;;
  gpu) overrides=(model=deepseek_ocr device=cuda) runs=${NIGHTLY_RUNS:-3} ;;
  *) usage ;;
esac
if ! [[ $runs =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NIGHTLY_RUNS must be a positive whole number, got '$runs'" >&2
  exit 2
fi
# Five timed repeats per job: compare tells noise from a change by the spread of the repeats.
overrides+=("mode=$modes" profiling.repeats=5)

sanitise() {
  tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//'
}

hardware_key() {
  if [[ $kind == cpu ]]; then
    "$python" -m llm_perf_opt.hardware.machine_key
  else
    local datasheet
    datasheet=$("$python" -c 'from llm_perf_opt.hardware.ceilings import select
s = select("auto", "cuda")
print(s.key or "gpu-" + s.device_name)')
    if [[ $datasheet == gpu-* ]]; then
      datasheet=$(printf '%s' "$datasheet" | sanitise)
    fi
    echo "$datasheet"
  fi
}

# The files of each finished job of the sweep $1 that compare reads, into $2/<job dir name>/.
slim_copy() {
  local job dest name
  for job in "$1"/*/; do
    [[ -f $job/run.json ]] || continue
    dest=$2/$(basename "$job")
    mkdir -p "$dest/.hydra"
    for name in run.json stages.csv stages.json; do
      if [[ -f $job/$name ]]; then
        cp "$job/$name" "$dest/"
      fi
    done
    cp "$job/.hydra/overrides.yaml" "$dest/.hydra/"
  done
}

hardware=$(hardware_key)
if [[ $# -eq 2 ]]; then
  echo "$hardware"
  exit 0
fi
out=${NIGHTLY_OUT:-outputs/nightly/$kind-$(date -u +%Y-%m-%d_%H-%M-%S)}
baselines=${NIGHTLY_BASELINES:-benchmarks/baselines}
baseline=$baselines/$hardware
summary=$out/comparison.md
echo "nightly $kind on $hardware: $runs sweeps into $out" >&2

sweep_status=0
current=()
for ((i = 1; i <= runs; i++)); do
  run=$out/run_$(printf %02d "$i")
  status=0
  "$python" -m llm_perf_opt.run -m "${overrides[@]}" "hydra.sweep.dir=$run" || status=$?
  sweep_status=$((status > sweep_status ? status : sweep_status))
  if [[ ! -d $run ]]; then  # refused before any job ran (e.g. no GPU): its error line says why
    exit "$sweep_status"
  fi
  current+=("$run")
done

candidate=$out/baseline-candidate/$hardware
if [[ $sweep_status -eq 0 ]]; then
  for run in "${current[@]}"; do
    slim_copy "$run" "$candidate/$(basename "$run")"
  done
fi

# A baseline holds its runs as run_<ii>/ (one sweep dir each); a baseline dir of job dirs is one run.
base_runs=()
for run in "$baseline"/run_*/; do
  [[ -d $run ]] && base_runs+=("${run%/}")
done
[[ ${#base_runs[@]} -gt 0 ]] || base_runs=("$baseline")

if [[ -d $baseline ]]; then
  status=0
  "$python" -m llm_perf_opt.compare "${base_runs[@]}" --current "${current[@]}" \
    --markdown-out "$summary" 2>"$out/compare.err" || status=$?
  cat "$out/compare.err" >&2
  if [[ ! -s $summary ]]; then  # compare refused (exit 2): its one line goes into the summary
    {
      echo "**ERROR**: cannot compare with the baseline \`$baseline\`:"
      echo
      sed 's/^/    /' "$out/compare.err"
    } >"$summary"
  fi
  status=$((status > sweep_status ? status : sweep_status))
else
  status=$sweep_status
  {
    echo "**NO BASELINE** for hardware \`$hardware\` (no \`$baseline/\`): nothing to compare with."
    echo
    if [[ $sweep_status -eq 0 ]]; then
      echo "Its $runs sweeps are stored as the baseline candidate \`$candidate/\` (in CI: in the run's artifact)."
      echo "To make it the baseline, from the repository root:"
      echo
      echo "    cp -r $candidate $baselines/"
      echo "    git add $baseline && git commit -m \"Nightly baseline for $hardware\""
    else
      echo "A sweep had failed jobs (exit $sweep_status), so the run is no baseline candidate."
    fi
  } >"$summary"
  cat "$summary"
fi
# The first sweep's own table, when the multirun wrote one (python -m llm_perf_opt.summarize).
if [[ -f $out/run_01/sweep_summary.md ]]; then
  {
    echo
    echo "Sweep run_01 of $runs:"
    echo
    cat "$out/run_01/sweep_summary.md"
  } >>"$summary"
fi
exit "$status"
