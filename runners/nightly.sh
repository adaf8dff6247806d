#!/usr/bin/env bash
# The nightly performance check: sweep every mode, compare with this machine's stored baseline.
#   runners/nightly.sh cpu                  # tiny model, every mode, on the CPU (CI's CPU job, make nightly)
#   runners/nightly.sh gpu                  # full model, every mode, on the GPU (CI's self-hosted GPU job)
#   runners/nightly.sh cpu --hardware-key   # only print the key that names this machine's baseline
#
# Writes into $NIGHTLY_OUT (default outputs/nightly/<kind>-<UTC time>):
#   <n>_<model>_<mode>/          the sweep's job dirs (hydra.sweep.dir)
#   comparison.md                the comparison with $NIGHTLY_BASELINES/<hardware>/ (CI's job summary)
#   baseline-candidate/<hardware>/  the sweep as a baseline holds it (run.json, stages.csv,
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
  cpu) overrides=(model=deepseek_ocr_tiny device=cpu) ;;
  gpu) overrides=(model=deepseek_ocr device=cuda) ;;
  *) usage ;;
esac
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

# The files of each finished job that compare reads, into $2/<job dir name>/.
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
echo "nightly $kind on $hardware: sweep into $out" >&2

sweep_status=0
"$python" -m llm_perf_opt.run -m "${overrides[@]}" "hydra.sweep.dir=$out" || sweep_status=$?
if [[ ! -d $out ]]; then  # refused before any job ran (e.g. no GPU): its error line says why
  exit "$sweep_status"
fi

candidate=$out/baseline-candidate/$hardware
if [[ $sweep_status -eq 0 ]]; then
  slim_copy "$out" "$candidate"
fi

if [[ -d $baseline ]]; then
  status=0
  "$python" -m llm_perf_opt.compare "$baseline" "$out" --markdown-out "$summary" 2>"$out/compare.err" || status=$?
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
      echo "This sweep is stored as the baseline candidate \`$candidate/\` (in CI: in the run's artifact)."
      echo "To make it the baseline, from the repository root:"
      echo
      echo "    cp -r $candidate $baselines/"
      echo "    git add $baseline && git commit -m \"Nightly baseline for $hardware\""
    else
      echo "The sweep had failed jobs (exit $sweep_status), so it is no baseline candidate."
    fi
  } >"$summary"
  cat "$summary"
fi
# The sweep's own table, when the multirun wrote one (python -m llm_perf_opt.summarize).
if [[ -f $out/sweep_summary.md ]]; then
  {
    echo
    cat "$out/sweep_summary.md"
  } >>"$summary"
fi
exit "$status"
