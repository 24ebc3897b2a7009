#!/usr/bin/env bash
# Decode tokens/s against the context length (issue #16), one command:
#
#   benches/decode.sh [CONTEXTS…]        (default 1024 8192 65536)
#
# For each model (T1 and the softmax transformer at the benchmark size of
# benches/training_step.rs) and each context C it compiles the decode-step bundle
# (`tnc compile --decode-step C`) and times one step at B = 1 with `tnc-run bench`
# (generated tokens, position and states: a step's work does not depend on their values).
# The transformer's KV cache is C rows (its step scores the one query row against it);
# NormAttention and DiagAttention keep no context-sized state. For comparison, the full-window program that generation ran
# before (`--next-token`, the chunked forward over C tokens per new token) is timed at
# the contexts up to 8192. The prefill (`--prefill C`: a C-token prompt through the
# chunked forward, returning the states) is timed at each context (the transformer's up
# to 8192), and T1's step at B = 8 (eight sequences decoded together).
# Build first: cargo build --release -p tnc -p tnc-runtime --bins
set -euo pipefail
cd "$(dirname "$0")/.."
contexts=("${@:-1024 8192 65536}")
read -r -a contexts <<<"${contexts[*]}"
tnc=target/release/tnc
run=target/release/tnc-run
[[ -x $tnc && -x $run ]] || { echo "build first: cargo build --release -p tnc -p tnc-runtime --bins" >&2; exit 2; }
sizes=(--set vocab=4096 --set dim=256 --set heads=4 --set layers=4 --set drop=0)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
median_ms() { sed -n 's/.*forward \([0-9.]*\) ms.*/\1/p' | tail -1; }
printf '| model | program | context | ms/token | tokens/s |\n|---|---|---:|---:|---:|\n'
for model in transnormer_t1 transformer; do
  extra=()
  if [[ $model == transnormer_t1 ]]; then extra=(--set glu_dim=683); fi
  for c in "${contexts[@]}"; do
    iters=30
    if [[ $model == transformer ]]; then iters=10; fi
    $tnc compile "models/$model.tn" "${sizes[@]}" "${extra[@]}" --decode-step "$c" --target native \
      -o "$out/$model-$c.tnb" >/dev/null
    ms=$($run bench "$out/$model-$c.tnb" --batch 1 --seq 1 --iters $iters --warmup 1 --forward-only 2>/dev/null | median_ms)
    printf '| %s | decode step | %d | %.3f | %.0f |\n' "$model" "$c" "$ms" "$(echo "1000 / $ms" | bc -l)"
    if [[ $model == transnormer_t1 && $c == "${contexts[0]}" ]]; then
      ms=$($run bench "$out/$model-$c.tnb" --batch 8 --seq 1 --iters $iters --warmup 1 --forward-only 2>/dev/null | median_ms)
      printf '| %s | decode step, B 8 | %d | %.3f | %.0f |\n' "$model" "$c" "$ms" "$(echo "8000 / $ms" | bc -l)"
    fi
  done
  for c in "${contexts[@]}"; do
    # The transformer's prefill is its O(N²) softmax attention: 75 s at 8192.
    if [[ $model == transformer && $c -gt 8192 ]]; then continue; fi
    $tnc compile "models/$model.tn" "${sizes[@]}" "${extra[@]}" --prefill "$c" --target native \
      -o "$out/$model-prefill.tnb" >/dev/null
    ms=$($run bench "$out/$model-prefill.tnb" --batch 1 --seq "$c" --iters 3 --warmup 1 --forward-only 2>/dev/null | median_ms)
    printf '| %s | prefill (ms per prompt) | %d | %.1f | %.0f |\n' "$model" "$c" "$ms" "$(echo "1000 * $c / $ms" | bc -l)"
  done
  $tnc compile "models/$model.tn" "${sizes[@]}" "${extra[@]}" --next-token --target native \
    -o "$out/$model-full.tnb" >/dev/null
  for c in "${contexts[@]}"; do
    # The window's O(C²) softmax attention per token: minutes at 8192 for the transformer.
    if [[ $c -gt 8192 || ( $model == transformer && $c -gt 1024 ) ]]; then continue; fi
    ms=$($run bench "$out/$model-full.tnb" --batch 1 --seq "$c" --iters 5 --warmup 1 --forward-only 2>/dev/null | median_ms)
    printf '| %s | full window (before) | %d | %.3f | %.0f |\n' "$model" "$c" "$ms" "$(echo "1000 / $ms" | bc -l)"
  done
done
