#!/usr/bin/env bash
# tnc's CPU training step of TransNormer T1 (with f32 and with bf16 products) side by side
# with PyTorch (eager, torch.compile, torch.compile under bf16 autocast) and JAX (jit), in
# one run, interleaved; prints one
# table (median, min, each time over tnc's) and checks every peer's loss and gradients
# against tnc's (and, in f64, PyTorch's against tnc's interpreter). The peers are `benches/peers/t1_torch.py` and `t1_jax.py`: T1 exactly as
# `models/transnormer_t1.tn` computes it (LRPE, biases, positions, embedding scale).
#
#   scripts/bench-peers.sh [--quick] [--seq N]... [--rounds R] [--steps K] [--peers LIST]
#
# The model is the benchmark T1 (`--set vocab=4096 dim=256 heads=4 layers=4 glu_dim=683
# drop=0`), B 2, N 1024 and 4096, in two variants: `peers` (`lrpe=false abs_pos=false
# embed_scale=false`, the model the peers were first compared on) and `t1` (as shipped).
# --quick: N 1024 only, 2 rounds. The first run installs torch, jax, numpy and safetensors
# from PyPI into target/peers-venv (about 5 GB). Results: target/bench-peers/results.json.
# Exit status 1 when a peer's loss or gradients differ from tnc's.
set -euo pipefail
cd "$(dirname "$0")/.."

seqs=()
rounds=5
steps=3
peers=torch-eager,torch-compile,torch-compile-bf16,jax
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) rounds=2; seqs=(1024) ;;
        --seq) seqs+=("$2"); shift ;;
        --rounds) rounds=$2; shift ;;
        --steps) steps=$2; shift ;;
        --peers) peers=$2; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-peers: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#seqs[@]} -gt 0 ] || seqs=(1024 4096)

venv=target/peers-venv
if ! "$venv/bin/python" -c 'import torch, jax, safetensors, numpy' >/dev/null 2>&1; then
    echo "bench-peers: installing torch, jax, numpy, safetensors into $venv (PyPI)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet torch jax numpy safetensors
fi

cargo build --release --quiet -p tnc -p tnc-runtime --bins
tnc=target/release/tnc
work=target/bench-peers
mkdir -p "$work"
sets=(--set vocab=4096 --set dim=256 --set heads=4 --set layers=4 --set glu_dim=683 --set drop=0)
declare -A variant_sets=([peers]="--set lrpe=false --set abs_pos=false --set embed_scale=false" [t1]="")
model_sets='"vocab=4096", "dim=256", "heads=4", "layers=4", "glu_dim=683", "drop=0"'
declare -A variant_config=(
    [peers]='{"heads": 4, "layers": 4, "block": 64, "lrpe": false, "abs_pos": false, "embed_scale": false,
              "sets": ['"$model_sets"', "lrpe=false", "abs_pos=false", "embed_scale=false"]}'
    [t1]='{"heads": 4, "layers": 4, "block": 64, "lrpe": true, "abs_pos": true, "embed_scale": true,
           "sets": ['"$model_sets"']}'
)
variants=()
for v in peers t1; do
    # shellcheck disable=SC2086
    "$tnc" compile models/transnormer_t1.tn --target native "${sets[@]}" ${variant_sets[$v]} -o "$work/$v.tnb" >/dev/null
    # shellcheck disable=SC2086
    "$tnc" compile models/transnormer_t1.tn --target native --precision bf16 "${sets[@]}" ${variant_sets[$v]} \
        -o "$work/$v-bf16.tnb" >/dev/null
    # shellcheck disable=SC2086
    "$tnc" init models/transnormer_t1.tn "${sets[@]}" ${variant_sets[$v]} --seed 0 --out "$work/$v-init.safetensors" >/dev/null
    variants+=(--variant "$v=${variant_config[$v]}")
done
seq_args=()
for n in "${seqs[@]}"; do seq_args+=(--seq "$n"); done

echo "bench-peers: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) threads," \
    "$(grep -o -w -E 'avx512f|amx_bf16|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')" >&2
"$venv/bin/python" benches/peers/run.py --tnc-run target/release/tnc-run --tnc "$tnc" \
    --model models/transnormer_t1.tn --work "$work" "${variants[@]}" \
    --vocab 4096 --batch 2 "${seq_args[@]}" --rounds "$rounds" --steps "$steps" --peers "$peers" \
    --json "$work/results.json"
