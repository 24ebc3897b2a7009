#!/usr/bin/env bash
# Prepares the GPU check on a development machine (Rust and LLVM; no GPU needed): builds
# the runtime-only `tnc-run` and `tnc`, compiles the bundles for a CUDA target, writes
# inputs, parameters and f64 interpreter references, and gathers everything that
# scripts/gpu-check.sh needs into one folder (default gpu-check/, git-ignored, < 64 MiB).
# The folder runs on a GPU machine with a driver, Python and PyTorch, and no Rust:
#
#     scripts/gpu-prepare.sh            # here
#     gpu-check/check.sh                # there
#
# Contents:
#   bin/tnc-run             stripped, links neither LLVM nor the compiler
#   bin/tnc-train           the runtime-only trainer (likewise)
#   bin/runtime-cuda-tests  the runtime's CUDA tests (hand-written PTX), if they built
#   cases/NAME/             correctness: bundle (or bundle_ref), inputs, params, ref (f64)
#   bench/NAME/             timing bundles (parameters drawn from a seed on the device)
#   train/NAME/, NAME.flags training bundles and their tnc-train flags: the copy task,
#                           T1-small (with train/t1_small.cpu.log, the CPU run's losses)
#                           and full-size T1 (timed with and without CUDA graphs)
#   cases/t1_tiny_bf16/, bench/transnormer_t1_bf16/, bench/t1_gemms_bf16.json
#                           the bf16 part (`TNC_CHECK_PART=bf16 check.sh`): tensor cores
#   cases/*_cublas/, bench/transnormer_t1*_cublas/
#                           the same with cuBLAS products (`tnc compile --gemm cublas`)
#   wheels/                 fla-core and einops (pip download --no-deps; PyPI needed
#                           here, none there) for flash-linear-attention as a peer
#   check.sh, *.py          the check itself
#
# Environment: TNC_GPU_TARGET (default sm80), TNC_PREPARE_SKIP_BUILD=1 to reuse binaries,
# TNC_BIN (the tnc to use; default target/release/tnc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=${1:-gpu-check}
TARGET=${TNC_GPU_TARGET:-sm80}
LIMIT_MIB=64

say() { echo "prepare: $*" >&2; }

if [ "${TNC_PREPARE_SKIP_BUILD:-0}" != 1 ]; then
    say "building tnc-run and tnc (release)"
    cargo build --release -p tnc-runtime --bin tnc-run
    cargo build --release -p tnc-train --bin tnc-train
    cargo build --release --bin tnc
fi
TNC=${TNC_BIN:-$ROOT/target/release/tnc}
RUN=$ROOT/target/release/tnc-run
TRAIN=$ROOT/target/release/tnc-train
for bin in "$RUN" "$TRAIN"; do
    if ldd "$bin" | grep -qi llvm; then
        say "error: $bin links LLVM"
        exit 1
    fi
done

rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/cases" "$DEST/bench" "$DEST/train"
LOG=$(mktemp)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$LOG" "$SCRATCH"' EXIT

# Compiles MODEL for the GPU target into DIR; the first failure explains itself and stops.
compile() {
    local dir=$1 model=$2
    shift 2
    if ! "$TNC" compile "$model" "$@" --target "$TARGET" -o "$dir" >"$LOG" 2>&1; then
        say "error: \`tnc compile $model $* --target $TARGET\` failed:"
        sed 's/^/    /' "$LOG" >&2
        if grep -qiE "not (yet )?(implemented|supported)|unknown ([a-z]+ )?target|valid ([a-z]+ )?targets|no .*back ?end" "$LOG"; then
            say "the $TARGET code generator (\`tnc compile --target $TARGET\`) is not available yet; nothing to prepare"
        fi
        exit 1
    fi
    # (A CPU target, e.g. TNC_GPU_TARGET=native, only exercises the scripts.)
    if [[ $TARGET == sm* ]] && { [ ! -f "$dir/kernels.ptx" ] || ! grep -q '"kind": *"cuda"' "$dir/manifest.json"; }; then
        say "error: \`tnc compile --target $TARGET\` did not write a CUDA bundle (no kernels.ptx / target kind cuda) in $dir"
        exit 1
    fi
}

# A correctness case: bundle, inputs, parameters from `tnc init`, and the interpreter's
# f64 outputs and gradients (`tnc run --grad --dtype f64`).
reference() {
    local case=$1 model=$2 inputs=$3
    shift 3
    "$TNC" init "$model" "$@" --seed 7 --out "$case/params.safetensors" >/dev/null
    say "reference for $(basename "$case") (interpreter, f64)"
    "$TNC" run "$model" "$@" --inputs "$inputs" --params "$case/params.safetensors" \
        --out "$case/ref.safetensors" --grad --dtype f64 >"$LOG" 2>&1 || {
        say "error: the interpreter reference failed:"
        sed 's/^/    /' "$LOG" >&2
        exit 1
    }
}

GPU=$ROOT/scripts/gpu
T1_TINY=(--set vocab=64 --set dim=32 --set heads=2 --set layers=2 --set glu_dim=48 --set block=8 --set drop=0.0)

say "compiling tiny T1 for $TARGET"
C=$DEST/cases/t1_tiny
mkdir -p "$C"
compile "$C/bundle" models/transnormer_t1.tn "${T1_TINY[@]}"
python3 "$GPU/make_inputs.py" "$C/inputs.safetensors" 1 tokens:i32:2x37:int\<64
reference "$C" models/transnormer_t1.tn "$C/inputs.safetensors" "${T1_TINY[@]}"

say "compiling tiny T1 with bf16 products (tensor cores) for $TARGET"
C=$DEST/cases/t1_tiny_bf16
mkdir -p "$C"
compile "$C/bundle" models/transnormer_t1.tn "${T1_TINY[@]}" --precision bf16
cp "$DEST/cases/t1_tiny/inputs.safetensors" "$C/inputs.safetensors"
"$TNC" init models/transnormer_t1.tn "${T1_TINY[@]}" --seed 7 --out "$C/params.safetensors" >/dev/null
# The reference is the interpreter on the model as compiled (its products' operands
# rounded to bf16), in f32; tests/bundles.rs holds the CPU's bf16 bundles to 1e-2 of it.
say "reference for t1_tiny_bf16 (interpreter, bf16 products, f32)"
"$TNC" run models/transnormer_t1.tn "${T1_TINY[@]}" --precision bf16 --dtype f32 --inputs "$C/inputs.safetensors" \
    --params "$C/params.safetensors" --out "$C/ref.safetensors" --grad >"$LOG" 2>&1 || {
    say "error: the bf16 interpreter reference failed:"
    sed 's/^/    /' "$LOG" >&2
    exit 1
}
echo 1e-2 >"$C/tol"
echo bf16 >"$C/part"

# The same two with cuBLAS products (`--gemm cublas`, GPU targets only), against the same
# references.
for base in t1_tiny t1_tiny_bf16; do
    [[ $TARGET == sm* ]] || break
    C=$DEST/cases/${base}_cublas
    mkdir -p "$C"
    precision=()
    [ "$base" = t1_tiny_bf16 ] && precision=(--precision bf16)
    compile "$C/bundle" models/transnormer_t1.tn "${T1_TINY[@]}" "${precision[@]}" --gemm cublas
    for f in inputs.safetensors params.safetensors ref.safetensors tol part; do
        [ -f "$DEST/cases/$base/$f" ] && cp "$DEST/cases/$base/$f" "$C/"
    done
done

say "compiling the linear attention (B any, H 32, d 128) for $TARGET"
LA=$DEST/bench/linear_attention
compile "$LA" models/bench/linear_attention.tn
C=$DEST/cases/linear_attention
mkdir -p "$C"
echo "bench/linear_attention" >"$C/bundle_ref"
python3 "$GPU/make_inputs.py" "$C/inputs.safetensors" 2 \
    q:f32:1x32x70x128:normal k:f32:1x32x70x128:normal v:f32:1x32x70x128:normal
reference "$C" models/bench/linear_attention.tn "$C/inputs.safetensors"

say "compiling TransNormer T1 (full size) for $TARGET"
compile "$DEST/bench/transnormer_t1" models/transnormer_t1.tn
# Its products' shapes at B 4, N 2048, from a CPU bundle's library GEMM nodes (named
# like the GPU bundle's tiled kernels), for the GEMM tiles against cuBLAS.
"$TNC" compile models/transnormer_t1.tn --target native -o "$SCRATCH/t1_cpu" >/dev/null
python3 "$GPU/gemms.py" extract "$SCRATCH/t1_cpu/manifest.json" 4 2048 >"$DEST/bench/t1_gemms.json"
say "compiling TransNormer T1 (full size) with bf16 products for $TARGET"
compile "$DEST/bench/transnormer_t1_bf16" models/transnormer_t1.tn --precision bf16
"$TNC" compile models/transnormer_t1.tn --target native --precision bf16 -o "$SCRATCH/t1_cpu_bf16" >/dev/null
python3 "$GPU/gemms.py" extract "$SCRATCH/t1_cpu_bf16/manifest.json" 4 2048 >"$DEST/bench/t1_gemms_bf16.json"
say "compiling TransNormer T1 (full size) with cuBLAS products, f32 and bf16, for $TARGET"
if [[ $TARGET == sm* ]]; then
    compile "$DEST/bench/transnormer_t1_cublas" models/transnormer_t1.tn --gemm cublas
    compile "$DEST/bench/transnormer_t1_bf16_cublas" models/transnormer_t1.tn --precision bf16 --gemm cublas
fi

# flash-linear-attention (its ops live in fla-core; Triton and PyTorch are on the GPU
# machine already), pinned, for check.sh to install with --no-deps.
mkdir -p "$DEST/wheels"
if ! pip download --quiet --no-deps --dest "$DEST/wheels" fla-core==0.6.0 einops==0.8.2 >"$LOG" 2>&1; then
    say "warning: could not download fla-core and einops (no PyPI?); the fla peer will be skipped:"
    sed 's/^/    /' "$LOG" >&2
fi

# Training: the copy task (as tests/learning.rs trains it on the emulated GPU), T1-small
# (its first 50 losses against the CPU run's, computed here), full-size T1 (timed).
TR=$DEST/train
COPY=(--set vocab=16 --set dim=32 --set heads=2 --set layers=2 --set glu_dim=64 --set block=16)
T1_SMALL=(--set vocab=256 --set dim=64 --set heads=2 --set layers=2 --set glu_dim=128 --set block=16 --set drop=0.0)
say "compiling the training bundles for $TARGET (copy task, T1-small, T1)"
compile "$TR/copy" models/tasks/mqar_t2.tn "${COPY[@]}" --train
echo "--data copy:vocab=16 --steps 200 --seq 16 --batch 8 --lr 1e-2 --warmup 10 --eval-batches 2 --seed 0" >"$TR/copy.flags"
compile "$TR/t1_small" models/transnormer_t1.tn "${T1_SMALL[@]}" --train
echo "--data copy:vocab=256 --steps 50 --seq 64 --batch 8 --lr 3e-3 --warmup 5 --eval-batches 1 --seed 0" >"$TR/t1_small.flags"
compile "$TR/t1_full" models/transnormer_t1.tn --train
echo "--data copy:vocab=1000 --steps 6 --seq 2048 --batch 4 --lr 1e-4 --eval-batches 1 --seed 0" >"$TR/t1_full.flags"
say "the CPU run of T1-small (its losses are the reference)"
"$TNC" compile models/transnormer_t1.tn "${T1_SMALL[@]}" --train --target native -o "$SCRATCH/t1_small_cpu" >/dev/null
# shellcheck disable=SC2046
"$TRAIN" "$SCRATCH/t1_small_cpu" --device cpu $(cat "$TR/t1_small.flags") --out "$SCRATCH/t1_small_run" \
    --no-checkpoints >"$TR/t1_small.cpu.log"

strip -o "$DEST/bin/tnc-run" "$RUN"
strip -o "$DEST/bin/tnc-train" "$TRAIN"
cp scripts/gpu-check.sh "$DEST/check.sh"
cp "$GPU"/st.py "$GPU"/compare.py "$GPU"/peers.py "$GPU"/table.py "$GPU"/training.py "$GPU"/gemms.py "$DEST/"
chmod +x "$DEST/check.sh" "$DEST/bin/tnc-run" "$DEST/bin/tnc-train"

# The runtime's CUDA tests (hand-written PTX through CudaExecutor and tnc-run), optional.
if [ "${TNC_PREPARE_SKIP_BUILD:-0}" != 1 ]; then
    TEST_BIN=$(cargo test --release -p tnc-runtime --test cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda": print(m["executable"])' |
        tail -1) || TEST_BIN=""
    if [ -n "$TEST_BIN" ]; then
        strip -o "$DEST/bin/runtime-cuda-tests" "$TEST_BIN"
    fi
fi

SIZE_KIB=$(du -sk "$DEST" | cut -f1)
# The device tool carries the folder with the repository's tracked tree: both count.
TREE_KIB=$(($(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c) / 1024))
say "$(objdump -T "$RUN" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1) is the newest glibc symbol tnc-run needs"
say "wrote $DEST ($((SIZE_KIB / 1024)) MiB):"
du -sh "$DEST"/bin/* "$DEST"/cases/* "$DEST"/bench/* "$DEST"/train/* >&2
if [ $((SIZE_KIB + TREE_KIB)) -ge $((LIMIT_MIB * 1024)) ]; then
    say "error: $DEST ($((SIZE_KIB / 1024)) MiB) and the tracked tree ($((TREE_KIB / 1024)) MiB) are over $LIMIT_MIB MiB"
    exit 1
fi
say "run it on a GPU machine: $DEST/check.sh (with the device tool: carry [\"$DEST\"], command"
say "\`$DEST/check.sh 2>&1\`; results.jsonl, summary.txt and logs.tgz come back in \$OUT)"
