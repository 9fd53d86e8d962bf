#!/usr/bin/env bash
# Builds the mps2-an386 firmware (boards/firmware/mps2-an386) and runs it under QEMU, streaming
# its output; exits with the firmware's own exit status (0 = every check passed), 124 when QEMU
# did not finish within the timeout, or 2 for a usage/build error.
#
# usage: boards/run-qemu.sh [--board mps2-an386|stm32f407] [--profile release|speed|dev]
#                           [--timeout SECONDS] [--icount SHIFT] [--no-run] [-- EXTRA_QEMU_ARGS...]
#
#   --board     mps2-an386 (default, runs under QEMU) or stm32f407 (a real MCU: build only, the
#               ELF is for probe-rs; its path is printed)
#   --profile   release: opt-level "s" (default); speed: opt-level 3; dev: opt-level 1, debug asserts
#   --timeout   seconds before QEMU is stopped (default 60, or $QEMU_TIMEOUT)
#   --icount    run QEMU with -icount shift=SHIFT: virtual time advances 2^SHIFT ns per
#               instruction, so counter readings are deterministic (instructions, not host time)
#   --no-run    build and print sizes only
#
# Build-time inputs (environment, see boards/README.md and firmware/mps2-an386/build.rs):
# EDGETUNE_MODEL, EDGETUNE_TEST_DATA, EDGETUNE_TEST_LABELS, EDGETUNE_TRAIN_DATA,
# EDGETUNE_TRAIN_LABELS, EDGETUNE_ADAPTER, EDGETUNE_ADAPTER_VALUES, EDGETUNE_ADAPTER_WORKSPACE,
# EDGETUNE_FINETUNE, EDGETUNE_ARENA_BYTES, EDGETUNE_ARENA_IN, EDGETUNE_FW_FAULT. Toolchain: CROSS_CARGO and
# CROSS_RUSTC (default Debian's /usr/bin/cargo and /usr/bin/rustc, see setup-cross.sh).
set -euo pipefail

BOARDS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BOARDS/.." && pwd)
FW_DIR=$BOARDS/firmware/mps2-an386
BIN=edgetune-mps2-an386
TARGET=thumbv7em-none-eabihf
TARGET_DIR=$ROOT/target/cross

BOARD=mps2-an386
PROFILE=release
TIMEOUT=${QEMU_TIMEOUT:-60}
ICOUNT=
RUN=1
QEMU_EXTRA=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "run-qemu: error: $*" >&2; exit 2; }

while (($#)); do
    case $1 in
        --board) BOARD=${2:?--board needs a value}; shift 2 ;;
        --profile) PROFILE=${2:?--profile needs a value}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --icount) ICOUNT=${2:?--icount needs a value}; shift 2 ;;
        --no-run) RUN=0; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; QEMU_EXTRA=("$@"); break ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case $PROFILE in
    release|speed) PROFILE_DIR=$PROFILE ;;
    dev) PROFILE_DIR=debug ;;
    *) die "--profile must be release, speed or dev (got '$PROFILE')" ;;
esac
FEATURES=()
case $BOARD in
    mps2-an386) ;;
    stm32f407) FEATURES=(--features stm32f407); RUN=0; TARGET_DIR=$ROOT/target/cross-stm32f407 ;;
    *) die "--board must be mps2-an386 or stm32f407 (got '$BOARD')" ;;
esac
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds"
[[ -z $ICOUNT || $ICOUNT =~ ^[0-9]+$ ]] || die "--icount must be a whole number"

CARGO=${CROSS_CARGO:-/usr/bin/cargo}
export RUSTC=${CROSS_RUSTC:-/usr/bin/rustc}
[[ -x $CARGO && -x $RUSTC ]] || die "$CARGO or $RUSTC missing: run boards/setup-cross.sh"
command -v ld.lld >/dev/null || die "ld.lld missing: run boards/setup-cross.sh"
((RUN == 0)) || command -v qemu-system-arm >/dev/null || die "qemu-system-arm missing: run boards/setup-cross.sh"

# Inputs given relative to where the script was called from become absolute for build.rs.
for var in EDGETUNE_MODEL EDGETUNE_TEST_DATA EDGETUNE_TEST_LABELS EDGETUNE_TRAIN_DATA EDGETUNE_TRAIN_LABELS EDGETUNE_ADAPTER; do
    if [[ -n ${!var:-} ]]; then
        [[ -f ${!var} ]] || die "$var=${!var}: no such file"
        export "$var=$(cd "$(dirname "${!var}")" && pwd)/$(basename "${!var}")"
    fi
done

# -Zbuild-std needs unstable features: Debian's stable cargo accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

echo "run-qemu: building $BIN for $BOARD (profile $PROFILE) with $("$RUSTC" --version)"
(cd "$FW_DIR" && "$CARGO" build -Zbuild-std=core --profile "$PROFILE" --target "$TARGET" \
    --target-dir "$TARGET_DIR" "${FEATURES[@]}") || die "build failed"
ELF=$TARGET_DIR/$TARGET/$PROFILE_DIR/$BIN
[[ -f $ELF ]] || die "build produced no $ELF"

# Section sizes from the ELF (readelf comes with binutils, a dependency of rustc).
declare -A SZ=()
while read -r name _type _addr _off size _rest; do
    SZ[$name]=$((16#$size))
done < <(readelf -S -W "$ELF" | sed -n 's/^ *\[ *[0-9]*\] //p')
sz() { echo "${SZ[$1]:-0}"; }
flash=$(( $(sz .vector_table) + $(sz .text) + $(sz .rodata) + $(sz .data) ))
ram=$(( $(sz .data) + $(sz .bss) + $(sz .uninit) ))
echo "run-qemu: $ELF"
echo "run-qemu: flash $flash B (.vector_table $(sz .vector_table), .text $(sz .text)," \
     ".rodata $(sz .rodata), .data $(sz .data)); static RAM $ram B (.data $(sz .data)," \
     ".bss $(sz .bss), .uninit $(sz .uninit))"

((RUN)) || exit 0

QEMU=(qemu-system-arm -machine mps2-an386 -cpu cortex-m4
      -semihosting-config enable=on,target=native
      -display none -monitor none -serial stdio)
[[ -z $ICOUNT ]] || QEMU+=(-icount "shift=$ICOUNT,align=off,sleep=off")
QEMU+=("${QEMU_EXTRA[@]}" -kernel "$ELF")

echo "run-qemu: ${QEMU[*]}"
echo "----------------------------------------------------------------------------------------"
# --foreground keeps QEMU in the terminal's process group so Ctrl-C still reaches it; stdin is
# /dev/null so QEMU never touches the terminal (and CI has no terminal anyway).
set +e
timeout --foreground -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null
status=$?
set -e
echo "----------------------------------------------------------------------------------------"
case $status in
    0) echo "run-qemu: firmware passed (exit status 0)" ;;
    124|137) echo "run-qemu: FAILED: no exit within ${TIMEOUT}s (firmware hung?)" >&2; status=124 ;;
    *) echo "run-qemu: FAILED: firmware exit status $status (see boards/README.md)" >&2 ;;
esac
exit "$status"
