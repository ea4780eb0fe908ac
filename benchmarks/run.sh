#!/usr/bin/env bash
# The standard minilm-vs-peers comparison: every row in ONE peers.py invocation (ratios are only
# meaningful within one invocation), then the minilm/peer ratios.
#
#   benchmarks/run.sh                      # one invocation, --repeats 5
#   RUNS=3 benchmarks/run.sh               # three invocations, plus the cross-run tables
#   benchmarks/run.sh --threads 4          # extra flags go to peers.py (the last one given wins)
#
# Environment: PY (python of the peers venv, default /tmp/peers/bin/python), PEERS (path to
# peers.py, default ../shared/bench/peers.py next to this repo), RUNS (default 1),
# PEERS_RESULTS (results folder, default ./peers-results).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-/tmp/peers/bin/python}"
PEERS="${PEERS:-$ROOT/../shared/bench/peers.py}"
RUNS="${RUNS:-1}"
RESULTS="${PEERS_RESULTS:-$ROOT/peers-results}"

# matmul is always measured first (peers.py moves it to the front): it sets the fp32 peak for MFU
# and the bf16 peak for the bf16 rows' "vs bf16 peak" figure, from this same invocation.
BENCH="matmul,gpt-hf-sdpa,gpt-hf-eager,gpt-minilm,gpt-minilm-rope,bf16-hf-sdpa,bf16-minilm,bf16-minilm-rope,gen-hf-cache,gen-minilm,gen-minilm-rope"

stamp="$(date +%Y%m%d-%H%M%S)"
outs=()
for i in $(seq 1 "$RUNS"); do
    out="$RESULTS/compare_${stamp}_run${i}.json"
    echo "### run $i/$RUNS -> $out" >&2
    "$PY" "$PEERS" --plugin benchmarks/peers_plugin.py --bench "$BENCH" --repeats 5 \
        --results-dir "$RESULTS" --out "$out" "$@"
    outs+=("$out")
done

echo
"$PY" benchmarks/ratios.py "${outs[@]}"
if [ "$RUNS" -gt 1 ]; then
    echo
    "$PY" "$PEERS" --merge "${outs[@]}"
fi
