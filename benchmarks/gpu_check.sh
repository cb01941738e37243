#!/usr/bin/env bash
# The GPU checks, in one call on a machine with a CUDA GPU (docs/scale.md "On a GPU"):
#   1. tests/test_cuda.py and tests/test_dispatched.py: every family on the GPU decides as on the CPU,
#      mask and slice agree, nothing leaves the device, bfloat16 stays bfloat16, a model split
#      between the GPU and the CPU prunes as the whole, LoRA recovery trains on the GPU;
#   2. the scale benchmark on the GPU in bfloat16, up to 7B and 8B shapes, with the default
#      configuration end to end at every size.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [SIZES] [SECONDS] [ESTIMATORS] [SAMPLES]
#
# The benchmark writes OUT_DIR/scale-gpu.{json,md,png} after every size, so a run stopped by its
# time limit (SECONDS, default 420) keeps the sizes it finished. SAMPLES: calibration rows of 128
# tokens (a second count runs at the first size only, for the token axis).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [SIZES] [SECONDS]}
sizes=${2:-1.1B,3B,7B,8B}
limit=${3:-420}
estimators=${4:-magnitude,taylor,activation,fluctuation}
samples=${5:-32,128}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
  nproc; free -g | head -2
} 2>&1 | tee "$out/env.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_dispatched.py 2>&1 | tee "$out/pytest.log" | tail -25
timeout "$limit" python3 benchmarks/scale_benchmark.py --device cuda --dtype bfloat16 --sizes "$sizes" \
  --estimators "$estimators" --samples "$samples" --seq-len 128 --threads 8 --defaults --out "$out/scale-gpu" \
  2>"$out/scale.log"
echo "scale benchmark exit $?"
tail -5 "$out/scale.log"
[ -f "$out/scale-gpu.md" ] && cat "$out/scale-gpu.md"
