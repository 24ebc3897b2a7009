#!/usr/bin/env bash
# Decode tokens/s against the context length (issue #16), one command:
#
#   benches/decode.sh [CONTEXTS…]        (default 1024 8192 65536)
#
# For each model (T1 and the softmax transformer at the benchmark size of
# benches/training_step.rs) and each context C it compiles the decode-step bundle
# (`tnc compile --decode-step C`) and times one step at B = 1 with `tnc-run bench`
# (generated tokens, position and states: a step's work does not depend on their values).
# The transformer's KV cache is C rows; NormAttention and DiagAttention keep no
# context-sized state. For comparison, the full-window program that generation ran
# before (`--next-token`, the chunked forward over C tokens per new token) is timed at
# the contexts up to 8192. Build first: cargo build --release -p tnc -p tnc-runtime --bins
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
    # The transformer's step evaluates its attention over the whole window (see
    # docs/generation.md): O(C²) per token, past 8192 minutes per step.
    if [[ $model == transformer && $c -gt 8192 ]]; then
      printf '| %s | decode step | %d | not run (the step scores the whole window, C×C) | |\n' "$model" "$c"
      continue
    fi
    iters=30
    if [[ $model == transformer ]]; then iters=3; fi
    $tnc compile "models/$model.tn" "${sizes[@]}" "${extra[@]}" --decode-step "$c" --target native \
      -o "$out/$model-$c.tnb" >/dev/null
    ms=$($run bench "$out/$model-$c.tnb" --batch 1 --seq 1 --iters $iters --warmup 1 --forward-only 2>/dev/null | median_ms)
    printf '| %s | decode step | %d | %.3f | %.0f |\n' "$model" "$c" "$ms" "$(echo "1000 / $ms" | bc -l)"
  done
  $tnc compile "models/$model.tn" "${sizes[@]}" "${extra[@]}" --next-token --target native \
    -o "$out/$model-full.tnb" >/dev/null
  for c in "${contexts[@]}"; do
    if [[ $c -gt 8192 ]]; then continue; fi
    ms=$($run bench "$out/$model-full.tnb" --batch 1 --seq "$c" --iters 5 --warmup 1 --forward-only 2>/dev/null | median_ms)
    printf '| %s | full window (before) | %d | %.3f | %.0f |\n' "$model" "$c" "$ms" "$(echo "1000 / $ms" | bc -l)"
  done
done
