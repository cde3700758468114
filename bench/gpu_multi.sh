#!/usr/bin/env bash
# Multi-GPU sampling (issue 19): view-, CFG- and prompt-parallel scaling over torchrun, in one or
# two device calls on a machine of several GPUs (nvidia-h100-x2/x4 or their H200 twins):
#   bench/gpu_multi.sh [views] [cfg] [prompts]          (default: views cfg)
# Every run is one `torchrun --standalone` launch of `python -m hrkernels.bench.multi_gpu` (rank 0
# appends a JSON line to $OUT/multi_gpu_runs.jsonl); the one-GPU baseline of each case runs first,
# on the same machine and with the same view batch size, and saves the latents the multi-GPU runs
# compare with bit for bit (printed: bitwise_equal, max_difference). A short table comes last.
#
#   views:   DemoFusion 4096^2 and APT 4096^2, parallel=views on 1, 2 (and 4 where there are 4 GPUs)
#   cfg:     FreeScale 4096^2 and ScaleCrafter 2048^2, parallel=cfg on 1 and 2
#   prompts: $PROMPTS (16) DemoFusion 2048^2 images on 1 and on every GPU (images per minute)
#   hybrid:  DemoFusion 4096^2 parallel=cfg on 2 and 4 (branches and views together: finer units
#            than whole calls, to float rounding of one GPU; see NOTES.md, "multi-GPU")
#
# Environment: STEPS (50), VIEW_BATCH (9: 4096^2 SDXL has 13, 34 and 65 views per step in its
# stages; batches of 9 give 2, 4 and 8 calls, which 2 and 4 ranks share evenly), PROMPTS (16),
# GPUS (default: all the machine has), OUT (bench/results/multi_gpu-latest), DRY_RUN=1 (the tiny
# SDXL pipeline on the CPU over gloo, 1 and 2 processes, small sizes: the script's own check).
# Budget on H100s at STEPS=50 (from the one-GPU end-to-end anchors): DemoFusion 4096^2 ~220 s on
# one GPU, so `views` is about 10 minutes on 1+2+4 GPUs: run `views` and `cfg prompts` as two
# device calls, or lower STEPS (per-step scaling is what is compared).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/multi_gpu-latest}"
mkdir -p "$OUT"
if [ $# -eq 0 ]; then set -- views cfg; fi
# NVLink multicast (NVLS) stays off on the lent machines (the device tool's KINDS notes).
export NCCL_NVLS_ENABLE=0

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

if [ "${DRY_RUN:-0}" = 1 ]; then
  TINY=--tiny; GPUS="${GPUS:-2}"; STEPS="${STEPS:-2}"; PROMPTS="${PROMPTS:-4}"
  VIEWS_SIZE=256; FREESCALE_SIZE=256; SCALECRAFTER_SIZE=256; PROMPTS_SIZE=256
  VIEW_BATCH="${VIEW_BATCH:-2}"
  export OMP_NUM_THREADS=1
else
  TINY=; GPUS="${GPUS:-$(nvidia-smi --list-gpus | wc -l)}"; STEPS="${STEPS:-50}"
  PROMPTS="${PROMPTS:-16}"
  VIEWS_SIZE=4096; FREESCALE_SIZE=4096; SCALECRAFTER_SIZE=2048; PROMPTS_SIZE=2048
  VIEW_BATCH="${VIEW_BATCH:-9}"
  python3 -m hrkernels info | tee "$OUT/info.txt"
  nvidia-smi --query-gpu=index,name,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv | tee -a "$OUT/info.txt"
  nvidia-smi topo -m | tee -a "$OUT/info.txt"
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'NCCL', torch.cuda.nccl.version())" | tee -a "$OUT/info.txt"
fi
RUNS="$OUT/multi_gpu_runs.jsonl"
REFS="${TMPDIR:-/tmp}/hrkernels-multi-gpu-references"
rm -rf "$REFS"; mkdir -p "$REFS"   # baselines of this invocation only
status=0

# launch NPROC MODE ARGS...: one torchrun launch of the benchmark module.
launch() {
  local nproc=$1; shift
  echo "--- $nproc process(es): $*"
  torchrun --standalone --nproc-per-node "$nproc" -m hrkernels.bench.multi_gpu "$@" $TINY \
    --steps "$STEPS" --out "$RUNS" 2>&1 | tee -a "$OUT/multi_gpu.log"
  status=$((status | ${PIPESTATUS[0]}))
}

# scaling METHOD SIZE MODE COUNTS...: the one-GPU baseline (once per invocation), then MODE on
# each count.
scaling() {
  local method=$1 size=$2 mode=$3; shift 3
  local ref="$REFS/${method}_${size}_${STEPS}_${VIEW_BATCH}.pt"
  if [ ! -f "$ref" ]; then
    launch 1 image --method "$method" --size "$size" --parallel none \
      --view-batch-size "$VIEW_BATCH" --reference "$ref"
  fi
  for n in "$@"; do
    if [ "$n" -le "$GPUS" ]; then
      launch "$n" image --method "$method" --size "$size" --parallel "$mode" \
        --view-batch-size "$VIEW_BATCH" --reference "$ref"
    fi
  done
}

for stage in "$@"; do
  echo "=== $stage ==="
  case "$stage" in
    views)
      scaling demofusion "$VIEWS_SIZE" views 2 4
      scaling apt "$VIEWS_SIZE" views 2 4
      ;;
    cfg)
      scaling freescale "$FREESCALE_SIZE" cfg 2
      scaling scalecrafter "$SCALECRAFTER_SIZE" cfg 2
      ;;
    hybrid)
      scaling demofusion "$VIEWS_SIZE" cfg 2 4
      ;;
    prompts)
      launch 1 prompts --method demofusion --size "$PROMPTS_SIZE" --prompts "$PROMPTS" \
        --view-batch-size "$VIEW_BATCH"
      launch "$GPUS" prompts --method demofusion --size "$PROMPTS_SIZE" --prompts "$PROMPTS" \
        --view-batch-size "$VIEW_BATCH"
      ;;
    *)
      echo "unknown stage $stage (views, cfg, hybrid, prompts)"; status=1
      ;;
  esac
done

echo "=== summary ==="
python3 - "$RUNS" "$OUT/multi_gpu.md" <<'EOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
def bitwise(run):
    if "bitwise_equal" not in run:
        return ""
    return "yes" if run["bitwise_equal"] else f"no (max diff {run['max_difference']:.2e})"
base = {}
for run in runs:
    if run["world_size"] == 1:
        base[(run["method"], run["size"], run["parallel"] == "prompts")] = run
lines = ["| method | size | mode | GPUs | s | speedup | efficiency | images/min | comm MiB/step | "
         "comm ms/step | peak GiB (max rank) | bitwise |",
         "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
for run in runs:
    one = base.get((run["method"], run["size"], run["parallel"] == "prompts"))
    speedup = one["seconds"] / run["seconds"] if one else float("nan")
    if run["parallel"] == "prompts" and one:
        speedup = run["images_per_minute"] / one["images_per_minute"]
    step = run.get("per_step", {})
    lines.append(
        f"| {run['method']} | {run['size']} | {run['parallel']} | {run['world_size']} | "
        f"{run['seconds']:.1f} | {speedup:.2f}x | {speedup / run['world_size']:.0%} | "
        f"{run.get('images_per_minute', float('nan')):.2f} | "
        f"{step.get('sent_bytes', 0) / 2**20:.2f} | {step.get('data_ms', 0):.2f} | "
        f"{max(run['peak_gib_per_rank']):.2f} | {bitwise(run)} |")
env = runs[-1] if runs else {}
lines.append(f"\n{env.get('gpu', 'CPU (dry run)')}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, NCCL {env.get('nccl')}")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $status
