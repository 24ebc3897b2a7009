#!/usr/bin/env bash
# The GPU check, run from the folder scripts/gpu-prepare.sh wrote (as its check.sh) on a
# machine with an NVIDIA GPU, its driver, Python 3 and PyTorch; no Rust, no network.
#
# 1. The runtime's own CUDA tests (hand-written PTX), when bin/runtime-cuda-tests is there.
# 2. Correctness: every cases/NAME is run with `tnc-run --device cuda --grad`, and the
#    forward outputs and every gradient are compared with the interpreter's f64 reference
#    (relative L2 below 1e-3).
# 3. Training (`tnc-train --device cuda`): the copy task learns (accuracy ≥ 0.9 after
#    200 steps); T1-small's first 50 losses agree with the CPU run's (1e-3); a training
#    step of full-size T1 (vocab 267,744) at B 4 × N 2048 with and without CUDA graphs:
#    step time, tokens/s and the memory allocated.
# 4. Timing: `tnc-run bench` of the linear attention at B 4, H 32, d 128, N 2K/8K/32K and
#    of TransNormer T1 at B 4, N 2048, and PyTorch peers at the same attention shapes
#    (masked quadratic and a chunked loop, each in f32 and bf16), printed as one table.
# 5. GEMM tiles against cuBLAS: every product of T1 (B 4, N 2048) timed in tnc's tiled
#    kernel (`TNC_PROFILE=1`) and with torch.matmul; and T1 compiled with cuBLAS products
#    (`--gemm cublas`: tnc's runtime calling cuBLAS) timed next to the tiles bundle, with
#    its profile's line of the products' time and rate. The cases/*_cublas correctness
#    cases run in section 2. libcublas comes from PyTorch's wheels (TNC_CUBLAS, found here
#    unless set).
#
# 6. With TNC_CHECK_PART=bf16 (or all), the bf16 part instead: tiny T1 with bf16 products
#    (tensor cores, mma.sync) against the interpreter run as compiled (rel L2 < 1e-2);
#    full-size T1 in bf16 at B 4, N 2048; its bf16 GEMM tiles against cuBLAS in bf16, as
#    a fraction of the tensor cores' peak (TNC_CHECK_BF16_PEAK, TFLOP/s, default 989:
#    H100/H200 SXM dense); and the linear attention against flash-linear-attention's
#    chunk_simple_gla (the wheels in wheels/, installed into out/pylib with --no-deps).
#
# Each part finishes in under 10 minutes: no step starts past TNC_CHECK_DEADLINE, each
# command's timeout is cut to what is left, and the peers stop starting new measurements
# past their time budget. Exit status 1 when a correctness check
# fails.
# Environment: TNC_CHECK_DEVICE (default cuda; `cpu` exercises the script with a CPU
# bundle set), TNC_CHECK_QUICK=1 (N 2K only), TNC_CHECK_SEQS ("2048 8192 32768"),
# TNC_CHECK_BATCH (4), TNC_CHECK_T1_SEQ (2048), TNC_CHECK_BENCH_TIMEOUT (150 s per
# bench), TNC_CHECK_PEERS=0 (skip the PyTorch peers), TNC_CHECK_PART (f32, the default;
# bf16; all), OUT_DIR (default out/), TNC_CHECK_DEADLINE (480 s: no step starts later,
# and each step's timeout is cut to what is left). Where the device tool's $OUT is set,
# what must come back is copied there at the end (results.jsonl, summary.txt and the logs
# as logs.tgz: three files, within its limit of eight).
set -u
DEVICE_OUT=${OUT:-}
cd "$(dirname "$0")"
DEVICE=${TNC_CHECK_DEVICE:-cuda}
OUT=${OUT_DIR:-out}
RUN=./bin/tnc-run
TRAIN=./bin/tnc-train
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
DEADLINE=${TNC_CHECK_DEADLINE:-480}
# limit T: T seconds, or what is left before the deadline if less; fails (prints 0) when
# under 20 s are left, so the step is skipped rather than cut off mid-way.
limit() {
    local left=$((DEADLINE - $(elapsed)))
    if [ "$left" -lt 20 ]; then
        echo 0
        return 1
    fi
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
# run_for T CMD…: CMD under `timeout` with limit T, killed 10 s after its SIGTERM (a
# trainer finishes its step first); exit status 124 without running when out of time.
run_for() {
    local t
    t=$(limit "$1") || {
        echo "(skipped, past the ${DEADLINE} s deadline: $2 …)" >&2
        return 124
    }
    shift
    timeout -k 10 "$t" "$@"
}
status=0
# At exit, however it comes: the table, and the files the device tool brings back.
finish() {
    [ -n "${SUMMARY_DONE:-}" ] && return
    SUMMARY_DONE=1
    {
        echo "== results ($(elapsed) s, part $PART; tnc's dtype as labelled (its attention kernels are f32); peers as labelled, TF32 off)"
        $PY table.py "$RESULTS"
        if [ $status = 0 ]; then echo "check: correctness OK"; else echo "check: correctness FAILED"; fi
    } | tee "$OUT/summary.txt"
    if [ -n "$DEVICE_OUT" ] && [ -d "$DEVICE_OUT" ]; then
        cp "$RESULTS" "$OUT/summary.txt" "$DEVICE_OUT/" 2>/dev/null
        tar czf "$DEVICE_OUT/logs.tgz" --exclude='*.safetensors' --exclude=pylib -C "$OUT" . 2>/dev/null
    fi
}
trap finish EXIT
PY=python3
PART=${TNC_CHECK_PART:-f32}
# part NAME: whether this run includes part NAME (f32 or bf16).
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
case $PART in f32 | bf16 | all) ;; *)
    echo "TNC_CHECK_PART must be f32, bf16 or all, not $PART"
    exit 2
    ;;
esac

# cuBLAS for the `--gemm cublas` bundles: the runtime loads TNC_CUBLAS, else libcublas.so.13
# (.12, .so) from the library path; PyTorch's wheels carry it under site-packages/nvidia.
if [ -z "${TNC_CUBLAS:-}" ]; then
    TNC_CUBLAS=$($PY -c 'import glob, os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
hits = [h for d in dirs for p in ("nvidia/cu13/lib", "nvidia/cublas/lib", "nvidia/cu12/lib")
        for h in sorted(glob.glob(os.path.join(d, p, "libcublas.so.*")))]
print(hits[0] if hits else "")' 2>/dev/null)
fi
if [ -n "${TNC_CUBLAS:-}" ]; then
    export TNC_CUBLAS
    # libcublasLt sits beside it.
    export LD_LIBRARY_PATH=$(dirname "$TNC_CUBLAS")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

echo "== host"
echo "cuBLAS for --gemm cublas bundles: ${TNC_CUBLAS:-(not found; those cases fail)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
ldd --version 2>/dev/null | head -1
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo "(no torch)"

if part f32 && [ -x bin/runtime-cuda-tests ] && [ "$DEVICE" = cuda ]; then
    echo "== runtime CUDA tests (hand-written PTX)"
    if TNC_RUN_BIN=$RUN run_for 120 bin/runtime-cuda-tests --test-threads 1 >"$OUT/runtime-tests.log" 2>&1; then
        grep -E "^test |test result" "$OUT/runtime-tests.log"
    else
        tail -40 "$OUT/runtime-tests.log"
        echo "FAIL runtime CUDA tests"
        status=1
    fi
fi

echo "== correctness (tnc-run --device $DEVICE vs the interpreter: f64, rel L2 < 1e-3; bf16 cases as compiled, < 1e-2)"
for case in cases/*/; do
    [ -d "$case" ] || { echo "(no cases: prepare with scripts/gpu-prepare.sh)"; break; }
    case=${case%/}
    name=$(basename "$case")
    part "$(cat "$case/part" 2>/dev/null || echo f32)" || continue
    tol=$(cat "$case/tol" 2>/dev/null || echo 1e-3)
    bundle=$case/bundle
    [ -f "$case/bundle_ref" ] && bundle=$(cat "$case/bundle_ref")
    if run_for 180 $RUN "$bundle" --device "$DEVICE" --inputs "$case/inputs.safetensors" \
        --params "$case/params.safetensors" --out "$OUT/$name.safetensors" --grad >"$OUT/$name.log" 2>&1; then
        $PY compare.py "$case/ref.safetensors" "$OUT/$name.safetensors" --label "$name" --tol "$tol" || status=1
        if [ "$DEVICE" = cuda ]; then
            # Again with every written buffer NaN-filled first: a kernel that misses part of
            # its output shows up as non-finite values.
            if run_for 180 $RUN "$bundle" --device "$DEVICE" --inputs "$case/inputs.safetensors" --debug-nan \
                --params "$case/params.safetensors" --out "$OUT/$name.nan.safetensors" --grad >"$OUT/$name.nan.log" 2>&1; then
                $PY compare.py "$case/ref.safetensors" "$OUT/$name.nan.safetensors" --label "$name (NaN-filled)" --tol "$tol" |
                    tail -1
                [ "${PIPESTATUS[0]}" = 0 ] || status=1
            else
                echo "FAIL $name (NaN-filled): tnc-run failed:"
                tail -5 "$OUT/$name.nan.log"
                status=1
            fi
        fi
    else
        echo "FAIL $name: tnc-run failed:"
        tail -20 "$OUT/$name.log"
        status=1
    fi
done

if part f32; then
echo "== training (tnc-train --device $DEVICE)"
# train NAME [extra tnc-train args]: trains train/NAME with its flags into $OUT/train-NAME.
train() {
    local name=$1
    shift
    [ -d "train/$name" ] || { echo "(no train/$name: prepare with scripts/gpu-prepare.sh)"; return 1; }
    rm -rf "$OUT/train-$name"
    # shellcheck disable=SC2046
    run_for "${TNC_CHECK_TRAIN_TIMEOUT:-150}" $TRAIN "train/$name" --device "$DEVICE" $(cat "train/$name.flags") \
        --out "$OUT/train-$name" "$@" >"$OUT/train-$name${TAG:-}.log" 2>&1 || {
        echo "FAIL tnc-train train/$name $*:"
        tail -5 "$OUT/train-$name${TAG:-}.log"
        return 1
    }
}
if train copy; then $PY training.py accuracy "$OUT/train-copy.log" 0.9 || status=1; else status=1; fi
if train t1_small --no-checkpoints; then
    $PY training.py compare "$OUT/train-t1_small.log" train/t1_small.cpu.log 50 1e-3 || status=1
else
    status=1
fi
# Full-size T1's step, with and without CUDA graphs (skipped past 240 s, keeping the
# whole check under 10 minutes).
for mode in graphs nographs; do
    if [ "$(elapsed)" -gt 240 ]; then
        echo "(T1 training step, $mode: skipped, time budget)"
        continue
    fi
    extra=()
    [ $mode = nographs ] && extra=(--no-graphs)
    TAG=.$mode train t1_full --no-checkpoints "${extra[@]}" &&
        $PY training.py step "$OUT/train-t1_full.$mode.log" "$mode" 4 2048 | tee -a "$RESULTS"
done

fi

echo "== timing"
# bench LABEL BUNDLE B N ITERS [extra tnc-run args]
bench() {
    local bundle=$1 b=$2 n=$3 iters=$4
    shift 4
    local model impl=tnc dtype=f32
    model=$(basename "$bundle")
    # A row for a bundle that did not run is labelled as its BENCH_JSON would be.
    [[ $model == *_cublas ]] && impl=tnc+cuBLAS
    [[ $model == *_bf16* ]] && dtype=bf16
    if [ ! -d "$bundle" ]; then
        printf '{"impl": "%s", "dtype": "%s", "model": "%s", "sizes": {"B": %s, "N": %s}, "error": "no bundle"}\n' \
            "$impl" "$dtype" "$model" "$b" "$n" >>"$RESULTS"
        return
    fi
    if [ "$(elapsed)" -gt 330 ]; then
        printf '{"impl": "%s", "dtype": "%s", "model": "%s", "sizes": {"B": %s, "N": %s}, "error": "skipped (time budget)"}\n' \
            "$impl" "$dtype" "$model" "$b" "$n" >>"$RESULTS"
        return
    fi
    local log=$OUT/bench-$model-$b-$n.log
    echo "tnc-run bench $bundle --batch $b --seq $n --iters $iters $*"
    run_for "${TNC_CHECK_BENCH_TIMEOUT:-150}" $RUN bench "$bundle" --device "$DEVICE" --batch "$b" --seq "$n" --iters "$iters" "$@" >"$log" 2>&1
    local rc=$?
    if [ $rc = 0 ]; then
        grep '^BENCH_JSON' "$log" | sed 's/^BENCH_JSON //' >>"$RESULTS"
    else
        local why
        why=$(grep -m1 -E '^(error|\(skipped)' "$log" | cut -c1-100 | tr '"' "'")
        [ -n "$why" ] || why="exit status $rc (124: timeout; see $log)"
        printf '{"impl": "%s", "dtype": "%s", "model": "%s", "sizes": {"B": %s, "N": %s}, "error": "%s"}\n' \
            "$impl" "$dtype" "$model" "$b" "$n" "$why" >>"$RESULTS"
        tail -3 "$log"
    fi
}

SEQS=${TNC_CHECK_SEQS:-2048 8192 32768}
[ "${TNC_CHECK_QUICK:-0}" = 1 ] && SEQS=2048
BATCH=${TNC_CHECK_BATCH:-4}
if part f32; then
for n in $SEQS; do
    iters=10
    [ "$n" -ge 8192 ] && iters=5
    [ "$n" -ge 32768 ] && iters=3
    bench bench/linear_attention "$BATCH" "$n" "$iters" --warmup 1
done
bench bench/transnormer_t1 "$BATCH" "${TNC_CHECK_T1_SEQ:-2048}" 5 --warmup 1 --vocab 267744
bench bench/transnormer_t1_cublas "$BATCH" "${TNC_CHECK_T1_SEQ:-2048}" 5 --warmup 1 --vocab 267744

if [ "$DEVICE" = cuda ] && [ "${TNC_CHECK_PEERS:-1}" = 1 ]; then
    echo "python3 peers.py (PyTorch)"
    seqs=$(echo "$SEQS" | tr ' ' ',')
    budget=$((DEADLINE - 80 - $(elapsed)))
    [ "$budget" -gt 20 ] || budget=20
    run_for $((budget + 60)) $PY peers.py --batch "$BATCH" --heads 32 --dim 128 --seqs "$seqs" --iters 10,5,3 \
        --budget-s "$budget" >>"$RESULTS" 2>"$OUT/peers.log" || {
        echo "peers.py failed or timed out:"
        tail -5 "$OUT/peers.log"
    }
fi

fi

# profile_products LABEL BUNDLE: TNC_PROFILE=1 of one forward + backward of a `--gemm cublas`
# bundle, and the lines of its library products' share and rate; sets VIA to the
# `gemms.py compare` arguments of its log when it ran (empty otherwise).
profile_products() {
    local label=$1 bundle=$2
    VIA=()
    [ "$DEVICE" = cuda ] && [ -d "$bundle" ] || return 0
    echo "== $label: cuBLAS products in tnc's runtime (TNC_PROFILE=1, B 4, N 2048)"
    if TNC_PROFILE=1 run_for 90 $RUN bench "$bundle" --device cuda --batch 4 --seq 2048 --iters 1 --warmup 0 \
        --vocab 267744 >"$OUT/$label-profile.out" 2>"$OUT/$label-profile.log"; then
        grep -E "^profile of|library products" "$OUT/$label-profile.log"
        VIA=(--runtime-cublas "$OUT/$label-profile.log")
    else
        echo "(the profiled $label run failed: see $OUT/$label-profile.log)"
        tail -3 "$OUT/$label-profile.log"
    fi
}

if part bf16; then
    echo "== bf16 (tensor cores)"
    bench bench/transnormer_t1_bf16 "$BATCH" "${TNC_CHECK_T1_SEQ:-2048}" 5 --warmup 1 --vocab 267744
    bench bench/transnormer_t1_bf16_cublas "$BATCH" "${TNC_CHECK_T1_SEQ:-2048}" 5 --warmup 1 --vocab 267744
    if [ "$DEVICE" = cuda ] && [ "${TNC_CHECK_PEERS:-1}" = 1 ]; then
        # flash-linear-attention next to tnc's linear attention (f32 kernels: the attention
        # ops keep f32 operands under --precision bf16) and the PyTorch chunked loop in bf16.
        for w in wheels/*.whl; do
            [ -f "$w" ] && $PY -m zipfile -e "$w" "$OUT/pylib" 2>/dev/null
        done
        for n in $SEQS; do
            iters=10
            [ "$n" -ge 8192 ] && iters=5
            [ "$n" -ge 32768 ] && iters=3
            part f32 || bench bench/linear_attention "$BATCH" "$n" "$iters" --warmup 1
        done
        seqs=$(echo "$SEQS" | tr ' ' ',')
        budget=$((DEADLINE - 80 - $(elapsed)))
        [ "$budget" -gt 20 ] || budget=20
        echo "python3 peers.py --peers fla,chunk_loop --dtypes bf16"
        PYTHONPATH=$OUT/pylib${PYTHONPATH:+:$PYTHONPATH} run_for $((budget + 60)) $PY peers.py --batch "$BATCH" --heads 32 \
            --dim 128 --seqs "$seqs" --iters 10,5,3 --peers fla,chunk_loop --dtypes bf16 --budget-s "$budget" \
            >>"$RESULTS" 2>"$OUT/peers-bf16.log" || {
            echo "peers.py (bf16) failed or timed out:"
            tail -5 "$OUT/peers-bf16.log"
        }
    fi
    if [ "$DEVICE" = cuda ] && [ -f bench/t1_gemms_bf16.json ] && [ "$(elapsed)" -lt 480 ]; then
        echo "== bf16 GEMM tiles (mma.sync) against cuBLAS in bf16 (T1's products at B 4, N 2048)"
        if TNC_PROFILE=1 run_for 120 $RUN bench bench/transnormer_t1_bf16 --device cuda --batch 4 --seq 2048 --iters 1 \
            --warmup 0 --vocab 267744 >"$OUT/t1-bf16-profile.out" 2>"$OUT/t1-bf16-profile.log"; then
            profile_products t1-bf16-cublas bench/transnormer_t1_bf16_cublas
            $PY gemms.py compare bench/t1_gemms_bf16.json "$OUT/t1-bf16-profile.log" --dtype bf16 \
                --peak "${TNC_CHECK_BF16_PEAK:-989}" "${VIA[@]}" 2>>"$RESULTS" || echo "(gemms.py failed)"
        else
            echo "(the profiled bf16 T1 run failed: see $OUT/t1-bf16-profile.log)"
            tail -3 "$OUT/t1-bf16-profile.log"
        fi
    fi
fi

if part f32 && [ "$DEVICE" = cuda ] && [ -f bench/t1_gemms.json ] && [ "$(elapsed)" -lt 480 ]; then
    echo "== GEMM tiles against cuBLAS (T1's products at B 4, N 2048; TNC_PROFILE=1 times each launch)"
    if TNC_PROFILE=1 run_for 120 $RUN bench bench/transnormer_t1 --device cuda --batch 4 --seq 2048 --iters 1 \
        --warmup 0 --vocab 267744 >"$OUT/t1-profile.out" 2>"$OUT/t1-profile.log"; then
        profile_products t1-cublas bench/transnormer_t1_cublas
        $PY gemms.py compare bench/t1_gemms.json "$OUT/t1-profile.log" "${VIA[@]}" 2>>"$RESULTS" ||
            echo "(gemms.py failed)"
    else
        echo "(the profiled T1 run failed: see $OUT/t1-profile.log)"
        tail -3 "$OUT/t1-profile.log"
    fi
fi


finish
exit $status
