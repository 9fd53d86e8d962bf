# Sourced by the aarch64 scripts (test-aarch64.sh, cli-aarch64.sh): Debian's cargo and rustc with
# -Zbuild-std (see setup-cross.sh; override with CROSS_CARGO / CROSS_RUSTC), the aarch64 linker,
# C compiler and qemu runner. The sourcing script sets NAME (for messages); this sets ROOT, CARGO,
# RUSTC and die.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARGO=${CROSS_CARGO:-/usr/bin/cargo}
export RUSTC=${CROSS_RUSTC:-/usr/bin/rustc}
die() { echo "$NAME: error: $*" >&2; exit 1; }
[[ -x "$CARGO" && -x "$RUSTC" ]] || die "Debian's cargo/rustc not found: run boards/setup-cross.sh first"
command -v qemu-aarch64 >/dev/null || die "qemu-aarch64 not found: run boards/setup-cross.sh first"

export RUSTC_BOOTSTRAP=1
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# tract-linalg assembles its arm64 kernels with the target's C compiler.
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
