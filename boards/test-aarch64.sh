#!/usr/bin/env bash
# Cross-builds the runtime's test suite for aarch64 Linux (phones, Raspberry Pi) and runs it under
# qemu-aarch64, so the NEON kernels are tested against the scalar reference on every CI run.
# Unit and integration tests (rustdoc cannot cross-run doctests with build-std). The gemm test asserts that `Kernels::best()` picked the NEON kernel there.
#
# Uses Debian's /usr/bin/cargo + /usr/bin/rustc with -Zbuild-std (see setup-cross.sh); override
# with CROSS_CARGO / CROSS_RUSTC. Extra arguments go to cargo test (e.g. `--release`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARGO=${CROSS_CARGO:-/usr/bin/cargo}
export RUSTC=${CROSS_RUSTC:-/usr/bin/rustc}
die() { echo "test-aarch64: error: $*" >&2; exit 1; }
[[ -x "$CARGO" && -x "$RUSTC" ]] || die "Debian's cargo/rustc not found: run boards/setup-cross.sh first"
command -v qemu-aarch64 >/dev/null || die "qemu-aarch64 not found: run boards/setup-cross.sh first"

export RUSTC_BOOTSTRAP=1
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

cd "$ROOT"
set -x
"$CARGO" test -Zbuild-std=std,panic_abort --target aarch64-unknown-linux-gnu \
    --target-dir "$ROOT/target/cross" -p edgetune-runtime --features std --tests "$@"
