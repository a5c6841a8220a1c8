#!/usr/bin/env bash
# The GPU check, in one run on a GPU machine with torch preinstalled:
#   bash bench/gpu_check.sh [OUTDIR] [all|rank-cost|grid]     (default OUTDIR: bench/results; default all)
# builds rankkd (CUDA kernels for this GPU), runs the GPU tests, bench/loss_bench.py (fp32 and bf16 with the default
# precision "fast", fp32 with precision "exact"), the ImageNet trainer's synthetic ResNet-34 -> ResNet-18 KD +
# ranking-loss throughput run, the CIFAR-100 trainer's synthetic ResNet32x4 -> ResNet8x4 one and the COCO trainer's
# synthetic R-101 -> R-18 one, and writes the logs
# and result files into OUTDIR. Kernel checks first: the hardware tanh over every float32
# (bench/tanh_approx_sweep.py), the fast path at large logit offsets (tests/test_fast_path_offsets.py, in the tests
# step) and the Triton kernel with 1, 2 and 3 parts per row at 512x1000 (bench/triton_parts.py, under ncu's
# warp-state and compute-workload sections when ncu is installed). Each step has its own time limit, and the whole
# run a budget of GPU_CHECK_BUDGET_S (default 580 s, under the device tool's 10 minutes a call): a step gets at most
# what is left of it, and a step with under 10 s left is skipped and reported. A failing step is reported and the
# rest still run; the exit status says whether all passed.
# rank-cost (a second device call): the build, then the same three trainer runs with --rank-weight 0, so that the
# ranking loss's share of the step is the difference of the two calls' train_img_s; this call, with time to spare,
# also runs bench/fused_linear_bench.py (the loss fused with an LM head against plain PyTorch, bf16).
# grid (a device call of its own): the build, then train/cifar100_table.py on synthetic data, four ResNet32x4 ->
# ResNet8x4 cells at once on the GPU (--parallel 4, 2 epochs of 300 steps): their summed epoch-2 images/s against the
# single run's cifar_synthetic number says what running cells side by side gains.
# Everything printed goes to OUTDIR/gpu_check.log, beside the result files (at most 8 files: what the device tool
# brings back).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-bench/results}" && cd "${1:-bench/results}" && pwd)
mode=${2:-all}
case $mode in
  all) rank_args=() suffix="" ;;
  rank-cost) rank_args=(--rank-weight 0) suffix="_no_rank" ;;
  grid) ;;
  *) echo "gpu_check.sh: the second argument must be all, rank-cost or grid, got '$mode'" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ]; then  # the toolkit root that nvcc belongs to (the nvcc on PATH may be a wrapper)
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    [ -f "$candidate/include/cuda_runtime.h" ] && export CUDA_HOME=$candidate && break
  done
fi
failed=()
budget_end=$((SECONDS + ${GPU_CHECK_BUDGET_S:-580}))

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit; its output goes to OUTDIR/gpu_check.log
  local name=$1 limit=$2
  shift 2
  local left=$((budget_end - SECONDS))
  if [ $left -lt 10 ]; then
    echo "== $name: skipped, the run's budget is spent" | tee -a "$log"
    failed+=("$name(skipped)")
    return
  fi
  [ "$limit" -gt $left ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local begin=$SECONDS
  timeout "$limit" "$@" >> "$log" 2>&1
  local status=$?
  echo "== $name: exit $status after $((SECONDS - begin)) s" | tee -a "$log"
  [ $status -eq 0 ] || failed+=("$name")
}

log=$out/gpu_check.log
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
} > "$log" 2>&1
cat "$log"

step build 90 env MAX_JOBS=16 python setup.py develop
if [ "$mode" = all ]; then
  # RANKKD_EXPECT_CUDA_KERNEL=1: a build that left out the CUDA kernel fails the tests instead of skipping them.
  step tests 150 env RANKKD_EXPECT_CUDA_KERNEL=1 python -m pytest -q -x tests/test_kendall.py tests/test_triton.py \
    tests/test_cuda.py tests/test_fast_path_offsets.py tests/test_losses.py tests/test_distill.py
  # Results print into the log (the device tool brings back at most 8 files).
  step tanh_sweep 30 python bench/tanh_approx_sweep.py
  if command -v ncu > /dev/null; then
    step triton_parts_ncu 60 ncu --section WarpStateStats --section ComputeWorkloadAnalysis \
      --kernel-name regex:_kendall_pairs_kernel --launch-skip 3 --launch-count 3 \
      python bench/triton_parts.py --parts 1,2,3 --profile
  fi
  step triton_parts 30 python bench/triton_parts.py --shape 512x1000 --parts 1,2,3
  step bench_fp32 70 python bench/loss_bench.py --device cuda --dtype float32 --json "$out/loss_cuda_float32.json"
  # The machine-code model (bench/kernel_report.py) for this GPU's architecture, its predictions written beside the
  # times just measured: checks the model itself.
  arch=$(python -c "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)")
  step kernel_report 25 python bench/kernel_report.py --archs "$arch" --out "$out" \
    --measured "$out/loss_cuda_float32.json"
  step bench_bf16 30 python bench/loss_bench.py --device cuda --dtype bfloat16 --shapes 512x1000,64x4096 \
    --backends cuda,triton --json "$out/loss_cuda_bfloat16.json"
  # precision "exact" (full float32 math) against the "fast" default above, fp32, both GPU backends.
  step bench_exact 30 python bench/loss_bench.py --device cuda --dtype float32 --precision exact \
    --shapes 512x1000,64x4096 --backends cuda,triton --json "$out/loss_cuda_float32_exact.json"
fi
if [ "$mode" = rank-cost ]; then
  # Six child processes (three shapes, fused and plain), each a few seconds of start-up for milliseconds of work.
  step fused_linear_bench 90 python bench/fused_linear_bench.py --device cuda --dtype bfloat16 \
    --json "$out/fused_linear_cuda_bfloat16.json"
fi

if [ "$mode" = grid ]; then
  grid_dir=$(mktemp -d)/grid
  step grid 420 python train/cifar100_table.py --data synthetic --pairs res32x4_res8x4 --methods kd+rank \
    --seeds 0,1,2,3 --epochs 2 --parallel 4 --out "$grid_dir" -- --steps-per-epoch 300 --log-every 100
  cp "$grid_dir/results.csv" "$out/grid_results.csv" 2>/dev/null
  python - "$grid_dir" <<'EOF' 2>&1 | tee -a "$log"
import json, pathlib, sys
rates = [json.loads(path.read_text().splitlines()[-1])["train_img_s"]
         for path in sorted(pathlib.Path(sys.argv[1]).glob("*/*/seed*/metrics.jsonl"))]
print(f"grid: {len(rates)} cells side by side, epoch 2 img/s each {[round(rate) for rate in rates]}, "
      f"summed {sum(rates):,.0f}")
EOF
  [ ${#failed[@]} -eq 0 ] && echo "grid check passed; results in $out" && exit 0
  echo "FAILED: ${failed[*]}"
  exit 1
fi

# Images/s of the whole training step (teacher, student, losses) without I/O; metrics.jsonl's train_img_s leaves the
# first logging interval (compilation, warm-up) out. The run folder stays outside OUTDIR: its checkpoints are large.
run_dir=$(mktemp -d)/synthetic-r34-r18
step "train_synthetic$suffix" 60 python train/imagenet.py --data synthetic --teacher resnet34 --student resnet18 \
  --loss imagenet-kd-rank --batch-size 256 --precision bf16 --channels-last --compile --epochs 1 \
  --steps-per-epoch 300 --log-every 100 "${rank_args[@]}" --out "$run_dir"
cp "$run_dir/metrics.jsonl" "$out/train_synthetic${suffix}_metrics.jsonl" 2>/dev/null
# CIFAR-100's recipe step (batch 64, bf16, compiled with CUDA graphs) on 50,000 random images through the
# device-resident data path, evaluation included: epoch 2's epoch_time_s x 240 is the full recipe's time.
cifar_dir=$(mktemp -d)/synthetic-res32x4-res8x4
step "cifar_synthetic$suffix" 75 python train/cifar100.py --data synthetic --pair res32x4_res8x4 --epochs 2 \
  --log-every 200 "${rank_args[@]}" --out "$cifar_dir"
cp "$cifar_dir/metrics.jsonl" "$out/cifar_synthetic${suffix}_metrics.jsonl" 2>/dev/null
# COCO's step (Faster R-CNN FPN R-101 -> R-18, DKD + ranking loss on 8 x 512 sampled RoIs x 81 classes, batch 8,
# bf16, backbones compiled) on random images and boxes: with rank-cost, the ranking loss's share of the step.
coco_dir=$(mktemp -d)/synthetic-coco-r101-r18
step "coco_synthetic$suffix" 60 python train/coco.py --data synthetic --pair r101_r18 --method dkd+rank \
  --epochs 1 --iters-per-epoch 100 --log-every 50 "${rank_args[@]}" --out "$coco_dir"
cp "$coco_dir/metrics.jsonl" "$out/coco_synthetic${suffix}_metrics.jsonl" 2>/dev/null
tail -n 40 "$log"

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed; results in $out"
