#!/usr/bin/env bash
# The board promise, end to end on the emulated Cortex-M4 (QEMU mps2-an386), as CI runs it:
#
# 1. the digits CNN compressed to a 4-bit codebook: the firmware's accuracy on the 450 embedded
#    test images must equal the host runtime's (`edgetune flash` checks and fails otherwise);
# 2. the same CNN compressed to ternary (the degraded start): zeroth-order fine-tuning on the
#    board, adapter saved to the A/B store and reloaded; accuracy must rise, the saved adapter
#    must equal a host run on the scalar reference kernels bit for bit (checked by `flash`);
# 3. a RAM budget the model cannot meet gives the budget error before anything is built.
#
# Needs boards/setup-cross.sh done. Uses the debug `edgetune` (shared with `cargo test`).
# Outputs go to target/flash-digits/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=target/flash-digits
D=tests/fixtures/digits
mkdir -p "$OUT"
cargo build -q -p edgetune-cli
ET=target/debug/edgetune

$ET compress $D/cnn.onnx --input x=1x1x8x8 --codebook 4 --calib x=$D/x_train.npy -o $OUT/cnn_cb4.etm --quiet
$ET compress $D/cnn.onnx --input x=1x1x8x8 --ternary 256 --keep-ends same --calib x=$D/x_train.npy -o $OUT/cnn_ternary.etm --quiet

echo "=== 4-bit codebook CNN: inference on the board vs the host"
$ET flash --board qemu-mps2-an386 $OUT/cnn_cb4.etm --data x=$D/x_test.npy --labels $D/y_test.npy --count 450 \
    --work-dir $OUT/cb4 | tee $OUT/cb4.log

echo "=== ternary CNN: zeroth-order fine-tuning on the board"
$ET flash --board qemu-mps2-an386 $OUT/cnn_ternary.etm --data x=$D/x_test.npy --labels $D/y_test.npy --count 450 \
    --train x=$D/x_train.npy --train-labels $D/y_train.npy --train-count 1347 \
    --finetune steps=300,batch=16,lr=0.003,seed=1 --trainable bias,scales \
    --adapter-out $OUT/board.eta --work-dir $OUT/ternary | tee $OUT/ternary.log
start=$(sed -n 's/^fine-tune: start accuracy \([0-9]*\)\/.*/\1/p' $OUT/ternary.log)
after=$(sed -n 's/^fine-tune: accuracy after \([0-9]*\)\/.*/\1/p' $OUT/ternary.log)
[[ -n $start && -n $after ]] || { echo "flash-digits: no accuracies in the board's output" >&2; exit 1; }
((after > start)) || { echo "flash-digits: fine-tuning did not help: $start -> $after of 450" >&2; exit 1; }
echo "flash-digits: on-device fine-tuning: $start -> $after of 450 correct"

echo "=== a budget the model does not fit"
if $ET flash --board qemu-mps2-an386 $OUT/cnn_ternary.etm --ram-budget 8K 2> $OUT/budget.err; then
    echo "flash-digits: an 8 KiB RAM budget was accepted" >&2; exit 1
fi
cat $OUT/budget.err
grep -q "does not fit qemu-mps2-an386: RAM: needs .* of 8192 B, .* B over; nothing was built" $OUT/budget.err
echo "flash-digits: passed"
