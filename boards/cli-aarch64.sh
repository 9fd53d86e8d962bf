#!/usr/bin/env bash
# Cross-builds the `edgetune` CLI (tract included) for aarch64 Linux and runs it under
# qemu-aarch64 on the digits CNN: import, run, and eval against tract with the test labels, so
# the host tool a phone or Raspberry Pi user would run is checked on every CI run.
#
# Toolchain and cross settings: boards/aarch64-env.sh. Outputs go to target/cross and target/cli-aarch64.
set -euo pipefail

NAME=cli-aarch64
source "$(dirname "${BASH_SOURCE[0]}")/aarch64-env.sh"

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
