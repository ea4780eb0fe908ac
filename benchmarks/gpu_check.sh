#!/usr/bin/env bash
# The checks and figures a session lent a CUDA machine records (benchmarks/README.md, "On a GPU"):
#   tests       the CUDA test file (tests/test_cuda.py) and the CUDA case of test_t5_noise
#   throughput  tokens/s and MFU of the default objective (clm): small preset eager and compiled,
#               base preset compiled, bf16
#   ddp         torchrun with NCCL on one GPU, DDP and FSDP2
#   peers       minilm against Hugging Face GPT-2 (benchmarks/gpu_peers.py; needs transformers)
#   bash benchmarks/gpu_check.sh [OUT_FOLDER] ["tests throughput ddp peers"]   (from the repo root)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=${1:-${OUT:-/tmp/gpu-check}}; mkdir -p "$out"
parts=${2:-tests throughput ddp peers}
work=/tmp/gpu-check-runs
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))"

run() {  # run NAME ARGS...: one training run; its last log lines (tok/s, MFU)
    local name=$1; shift
    local started=$SECONDS
    "$@" --out_dir "$work" --overwrite true --eval_every 100000 --ckpt_every 100000 --log_every 20 \
        > "$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - started)) s"
    grep -E 'tok/s|^error' "$out/$name.log" | tail -2
}
if [[ $parts == *tests* ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_t5_noise.py > "$out/pytest.txt" 2>&1
    grep -E '^(FAILED|ERROR)|passed|failed' "$out/pytest.txt" | tail -12
fi
if [[ $parts == *throughput* || $parts == *ddp* ]]; then
    # the tokenizer and the tokens once: every run below reuses them (same data, same vocab)
    python3 train.py --max_steps 0 --out_dir "$work" > "$out/prepare.log" 2>&1 || { tail -5 "$out/prepare.log"; exit 1; }
fi
if [[ $parts == *throughput* ]]; then
    run small-bf16-eager python3 train.py --preset small --device cuda --dtype bf16 --batch_size 64 --max_steps 200
    run small-bf16-compiled python3 train.py --preset small --device cuda --dtype bf16 --batch_size 64 --max_steps 200 --compile true
    run base-bf16-compiled python3 train.py --preset base --device cuda --dtype bf16 --batch_size 16 --max_steps 120 --compile true
fi
if [[ $parts == *ddp* ]]; then
    run small-ddp-nccl torchrun --standalone --nproc_per_node 1 train.py --preset small --device cuda --batch_size 64 --max_steps 100 --warmup_steps 20
    run small-fsdp2-nccl torchrun --standalone --nproc_per_node 1 train.py --preset small --device cuda --batch_size 64 --max_steps 100 --warmup_steps 20 --fsdp true
fi
if [[ $parts == *peers* ]]; then
    python3 benchmarks/gpu_peers.py --steps 30 2>&1 | tee "$out/peers.txt" | grep -v Warning
fi
