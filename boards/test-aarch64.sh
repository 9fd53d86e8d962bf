#!/usr/bin/env bash
# Cross-builds the runtime's test suite for aarch64 Linux (phones, Raspberry Pi) and runs it under
# qemu-aarch64, so the NEON kernels are tested against the scalar reference on every CI run.
# Unit and integration tests (rustdoc cannot cross-run doctests with build-std). The gemm test asserts that `Kernels::best()` picked the NEON kernel there.
#
# Toolchain and cross settings: boards/aarch64-env.sh. Extra arguments go to cargo test (e.g. `--release`).
set -euo pipefail

NAME=test-aarch64
source "$(dirname "${BASH_SOURCE[0]}")/aarch64-env.sh"

cd "$ROOT"
set -x
"$CARGO" test -Zbuild-std=std,panic_abort --target aarch64-unknown-linux-gnu \
    --target-dir "$ROOT/target/cross" -p edgetune-runtime --features std --tests "$@"
