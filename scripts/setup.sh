#!/usr/bin/env bash
# One-time set-up on a fresh Debian 12 machine with Rust installed: the system packages
# and Python wheels tnc's build and tests need. Safe to run again; it skips what is there.
set -euo pipefail

need_apt=()
# LLVM 19 (dynamic library and headers) for the code generators.
[ -e /usr/lib/llvm-19/lib/libLLVM.so ] || need_apt+=(llvm-19-dev)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)

if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${need_apt[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# ptxas and libdevice.10.bc for the NVPTX back end (emit_ptx links libdevice; the tests
# assemble the PTX with ptxas), from NVIDIA's `nvidia-cuda-nvcc-cu12` wheel.
if ! python3 -c 'import nvidia.cuda_nvcc' >/dev/null 2>&1; then
    echo "setup: installing the nvidia-cuda-nvcc-cu12 wheel (ptxas, libdevice)" >&2
    if ! python3 -m pip --version >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
    fi
    pip_log=$(mktemp)
    if ! python3 -m pip install --quiet nvidia-cuda-nvcc-cu12 2>"$pip_log"; then
        # Debian 12's python3 is "externally managed" (PEP 668): pip refuses without this.
        if grep -q externally-managed-environment "$pip_log"; then
            python3 -m pip install --quiet --break-system-packages nvidia-cuda-nvcc-cu12
        else
            cat "$pip_log" >&2
            rm -f "$pip_log"
            exit 1
        fi
    fi
    rm -f "$pip_log"
fi
nvcc_dir=$(python3 -c 'import nvidia.cuda_nvcc as m; print(list(m.__path__)[0])')
[ -x "$nvcc_dir/bin/ptxas" ] && [ -f "$nvcc_dir/nvvm/libdevice/libdevice.10.bc" ] || {
    echo "setup: $nvcc_dir lacks bin/ptxas or nvvm/libdevice/libdevice.10.bc" >&2
    exit 1
}
echo "setup: ready (LLVM $(/usr/lib/llvm-19/bin/llvm-config --version 2>/dev/null || echo 'not found'), ptxas in $nvcc_dir/bin)" >&2
