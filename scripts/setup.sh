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
echo "setup: ready (LLVM $(/usr/lib/llvm-19/bin/llvm-config --version 2>/dev/null || echo 'not found'))" >&2
