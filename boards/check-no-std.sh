#!/usr/bin/env bash
# Builds the no_std crates for a bare-metal Cortex-M4F target, where `std` does not exist, so a
# stray `std` use (in the crates or in a dependency's default features) fails here instead of on
# a board. Crates: edgetune-core, edgetune-runtime (default features) and edgetune-boards.
#
# Uses Debian's /usr/bin/cargo + /usr/bin/rustc with -Zbuild-std=core (see setup-cross.sh);
# override with CROSS_CARGO / CROSS_RUSTC (e.g. a nightly with rust-src). Artifacts go to
# target/cross so they never disturb host builds. Extra arguments go to cargo build,
# e.g. `--release`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARGO=${CROSS_CARGO:-/usr/bin/cargo}
export RUSTC=${CROSS_RUSTC:-/usr/bin/rustc}
TARGET=${CROSS_TARGET:-thumbv7em-none-eabihf}
TARGET_DIR=${CROSS_TARGET_DIR:-$ROOT/target/cross}

die() { echo "check-no-std: error: $*" >&2; exit 1; }
[[ -x "$CARGO" ]] || die "$CARGO not found: run boards/setup-cross.sh first"
[[ -x "$RUSTC" ]] || die "$RUSTC not found: run boards/setup-cross.sh first"

# build-std is a nightly feature; Debian's stable toolchain accepts it with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
# A stable toolchain's RUSTFLAGS/target config from the environment would leak in; start clean.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

cd "$ROOT"
echo "check-no-std: $("$RUSTC" --version), target $TARGET"
set -x
"$CARGO" build -Zbuild-std=core --target "$TARGET" --target-dir "$TARGET_DIR" \
    -p edgetune-core -p edgetune-runtime -p edgetune-boards "$@"
{ set +x; } 2>/dev/null
echo "check-no-std: ok (edgetune-core, edgetune-runtime, edgetune-boards build for $TARGET)"
