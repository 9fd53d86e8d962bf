#!/usr/bin/env bash
# Cross-builds the `edgetune` CLI (tract included) for aarch64 Linux and runs it under
# qemu-aarch64 on the digits CNN: import, run, and eval against tract with the test labels, so
# the host tool a phone or Raspberry Pi user would run is checked on every CI run.
#
# Uses Debian's /usr/bin/cargo + /usr/bin/rustc with -Zbuild-std (see setup-cross.sh); override
# with CROSS_CARGO / CROSS_RUSTC. Outputs go to target/cross and target/cli-aarch64.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARGO=${CROSS_CARGO:-/usr/bin/cargo}
export RUSTC=${CROSS_RUSTC:-/usr/bin/rustc}
die() { echo "cli-aarch64: error: $*" >&2; exit 1; }
[[ -x "$CARGO" && -x "$RUSTC" ]] || die "Debian's cargo/rustc not found: run boards/setup-cross.sh first"
command -v qemu-aarch64 >/dev/null || die "qemu-aarch64 not found: run boards/setup-cross.sh first"

export RUSTC_BOOTSTRAP=1
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# tract-linalg assembles its arm64 kernels with the target's C compiler.
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

cd "$ROOT"
"$CARGO" build -Zbuild-std=std,panic_abort --target aarch64-unknown-linux-gnu \
    --target-dir "$ROOT/target/cross" --profile cross-smoke -p edgetune-cli --bin edgetune "$@"
ET=(qemu-aarch64 -L /usr/aarch64-linux-gnu "$ROOT/target/cross/aarch64-unknown-linux-gnu/cross-smoke/edgetune")
OUT=target/cli-aarch64
D=tests/fixtures/digits
mkdir -p "$OUT"
set -x
"${ET[@]}" --version
"${ET[@]}" import $D/cnn.onnx --input x=50x1x8x8 -o $OUT/cnn.etm
"${ET[@]}" run $OUT/cnn.etm --input x=$D/x_test.npy -o $OUT/logits.npy
"${ET[@]}" eval $OUT/cnn.etm --reference $D/cnn.onnx --data x=$D/x_test.npy --labels $D/y_test.npy --json > $OUT/eval.json
set +x
cat $OUT/eval.json
# The same accuracy as the host (448 of 450) and tract's logits within 1e-4.
python3 - "$OUT/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
acc, err = r["accuracy"], r["vs_reference"][0]["max_abs"]
assert abs(acc - 448 / 450) < 1e-9, f"accuracy {acc}"
assert err <= 1e-4, f"max abs error vs tract {err}"
print(f"cli-aarch64: edgetune eval under qemu-aarch64: accuracy {acc:.4%}, max |ours - tract| {err:.2e}")
PY
