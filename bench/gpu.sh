#!/usr/bin/env bash
# The GPU half of issue 12's benchmarks, in one go (a lent machine is held by the minute):
#   bash bench/gpu.sh            # from the repository root, on a machine with a CUDA GPU
# Carried wheels in .whl/ (transformers, peft at this project's versions) are installed to /tmp/site first when
# present. Results are appended to bench/RESULTS.md as each script does on CPU.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import flash_attn" 2>/dev/null && echo "flash-attn installed" || echo "flash-attn NOT installed"
run() { echo "+ $*"; "$@" || echo "FAILED: $*"; }
run python3 bench/train.py --size small --repeats 1 --steps 2 --device cuda --dtype bfloat16 --packing --no-record
for what in ${@:-train42 train05 generate}; do
  case $what in
    train42)  # issue 12's 42M model and length mix, bf16: padded and packed against the padded reference
      run python3 bench/train.py --device cuda --dtype bfloat16 --repeats 3 --steps 10 --warmup 3
      run python3 bench/train.py --device cuda --dtype bfloat16 --repeats 3 --steps 10 --warmup 3 --packing ;;
    train05)  # a Qwen2.5-0.5B-shaped LLM: throughput against the reference and MFU, packed
      run python3 bench/train.py --size 0.5b --batch 16 --device cuda --dtype bfloat16 --repeats 2 --steps 8 --warmup 3 --packing --pack-length 4096 ;;
    generate)
      run python3 bench/generate.py --device cuda --dtype bfloat16 --repeats 3 ;;
    *) echo "unknown section $what" ;;
  esac
done
