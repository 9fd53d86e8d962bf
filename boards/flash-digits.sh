#!/usr/bin/env bash
# The board promise, end to end on the emulated Cortex-M4 (QEMU mps2-an386), as CI runs it:
#
# 1. the digits CNN compressed to a 4-bit codebook: the firmware's accuracy on the 450 embedded
#    test images must equal the host runtime's (`edgetune flash` checks and fails otherwise);
# 2. the same CNN compressed to ternary (the degraded start): zeroth-order fine-tuning on the
#    board, adapter saved to the A/B store and reloaded; accuracy must rise, the saved adapter
#    must equal a host run on the scalar reference kernels bit for bit (checked by `flash`);
# 3. the same bundle built for a real MCU (STM32F407, an ELF for probe-rs), its memory map checked;
# 4. models that do not fit a board's flash or RAM give the budget error before anything is built.
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

echo "=== the fine-tuning bundle for the STM32F407 (build only)"
$ET flash --board stm32f407 $OUT/cnn_ternary.etm --data x=$D/x_test.npy --labels $D/y_test.npy --count 450 \
    --train x=$D/x_train.npy --train-labels $D/y_train.npy --train-count 1347 \
    --finetune steps=300,batch=16,lr=0.003,seed=1 --work-dir $OUT/stm32f407 | tee $OUT/stm32f407.log
ELF=$(sed -n 's/^run-qemu: \(.*cross-stm32f407.*\)$/\1/p' $OUT/stm32f407.log)
readelf -S -W "$ELF" > $OUT/stm32f407.sections
for want in ".vector_table *PROGBITS *08000000" ".adapter_store *NOBITS *080c0000" ".bss *NOBITS *2000"; do
    grep -Eq "$want" $OUT/stm32f407.sections || { echo "flash-digits: stm32f407 ELF: no section like '$want'" >&2; exit 1; }
done
echo "flash-digits: stm32f407 ELF $ELF: code and model in flash at 0x08000000, adapters in sectors 10-11, statics in SRAM"

echo "=== models that do not fit"
expect_budget_error() {
    local want=$1; shift
    if $ET flash "$@" 2> $OUT/budget.err; then
        echo "flash-digits: 'edgetune flash $*' was accepted" >&2; exit 1
    fi
    cat $OUT/budget.err
    grep -Eq "$want" $OUT/budget.err || { echo "flash-digits: expected an error like '$want'" >&2; exit 1; }
}
expect_budget_error "does not fit qemu-mps2-an386: RAM: needs .* of 8192 B, .* B over; nothing was built" \
    --board qemu-mps2-an386 $OUT/cnn_ternary.etm --ram-budget 8K
$ET import "$ROOT/../shared/models/minilm-l6/model.onnx" --input input_ids=1x16 --input attention_mask=1x16 \
    --input token_type_ids=1x16 -o $OUT/minilm.etm > /dev/null
expect_budget_error "does not fit stm32f407: flash: needs .* of 786432 B, .* B over.*nothing was built" \
    --board stm32f407 $OUT/minilm.etm
echo "flash-digits: passed"
