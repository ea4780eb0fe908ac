#!/usr/bin/env bash
# The checks and figures a session lent a CUDA machine records (benchmarks/README.md, "On a GPU"):
# the CUDA test file, then training throughput and MFU of the default objective (clm) at the
# small and base presets, eager and compiled, and torchrun with NCCL (DDP and FSDP2) on one GPU.
#   bash benchmarks/gpu_check.sh [OUT_FOLDER]       (run from the repository root)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=${1:-${OUT:-/tmp/gpu-check}}; mkdir -p "$out"
work=/tmp/gpu-check-runs
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_t5_noise.py > "$out/pytest.txt" 2>&1; tail -8 "$out/pytest.txt"

run() {  # run NAME ARGS...: one training run; its last log lines (tok/s, MFU) and its metrics
    local name=$1; shift
    local started=$SECONDS
    "$@" --out_dir "$work" --overwrite true --eval_every 100000 --ckpt_every 100000 --log_every 20 \
        > "$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - started)) s"
    grep -E 'tok/s' "$out/$name.log" | tail -2
}
# the tokenizer and the tokens once (every run below reuses them: same data, same vocab)
python3 train.py --max_steps 0 --out_dir "$work" > "$out/prepare.log" 2>&1 || { tail -5 "$out/prepare.log"; exit 1; }
run small-bf16-eager python3 train.py --preset small --device cuda --dtype bf16 --batch_size 64 --max_steps 200
run small-bf16-compiled python3 train.py --preset small --device cuda --dtype bf16 --batch_size 64 --max_steps 200 --compile true
run base-bf16-compiled python3 train.py --preset base --device cuda --dtype bf16 --batch_size 16 --max_steps 120 --compile true
run small-ddp-nccl torchrun --standalone --nproc_per_node 1 train.py --preset small --device cuda --batch_size 64 --max_steps 100 --warmup_steps 20
run small-fsdp2-nccl torchrun --standalone --nproc_per_node 1 train.py --preset small --device cuda --batch_size 64 --max_steps 100 --warmup_steps 20 --fsdp true
