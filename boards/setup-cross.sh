#!/usr/bin/env bash
# Installs what the cross builds and the QEMU runs need, from Debian's packages, and prints the
# versions. Idempotent: when everything is there it only checks and prints (well under a second),
# and it runs `apt-get update` only when something is missing.
#
#   rustc-web, cargo-web   /usr/bin/rustc and /usr/bin/cargo (1.96): accept -Zbuild-std with
#                          RUSTC_BOOTSTRAP=1, which rustup's stable toolchain here cannot use
#   rust-web-src           the standard library sources -Zbuild-std=core compiles for thumbv7em
#   lld                    ld.lld, the linker for the Cortex-M firmware
#   qemu-system-arm        runs the firmware on the mps2-an386 machine (Cortex-M4F)
#   qemu-user              qemu-aarch64, runs aarch64 Linux test binaries (NEON kernels)
#   gcc-aarch64-linux-gnu, libc6-dev-arm64-cross
#                          linker and libc for aarch64-unknown-linux-gnu test binaries
#
# Needs root (or passwordless sudo) only when something has to be installed.
set -euo pipefail

PACKAGES=(rustc-web cargo-web rust-web-src lld qemu-system-arm qemu-user
          gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
# A command or file from each package, checked too, in case a package is half-removed.
PROBES=(/usr/bin/rustc /usr/bin/cargo /usr/lib/rustlib/src/rust/library/Cargo.lock
        ld.lld qemu-system-arm qemu-aarch64 aarch64-linux-gnu-gcc
        /usr/aarch64-linux-gnu/include/stdio.h)

die() { echo "setup-cross: error: $*" >&2; exit 1; }

package_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

probe_ok() {
    if [[ "$1" == /* ]]; then [[ -e "$1" ]]; else command -v "$1" >/dev/null 2>&1; fi
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    package_installed "$pkg" || missing+=("$pkg")
done
broken=()
for probe in "${PROBES[@]}"; do
    probe_ok "$probe" || broken+=("$probe")
done

if ((${#missing[@]} > 0 || ${#broken[@]} > 0)); then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian-based system"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null \
            || die "need root to install: ${missing[*]:-${PACKAGES[*]}} (run as root or with passwordless sudo)"
        SUDO=(sudo -n)
    fi
    ((${#missing[@]} > 0)) || missing=("${PACKAGES[@]}")  # files gone but packages "installed"
    echo "setup-cross: installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq || die "apt-get update failed"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
    still=()
    for probe in "${PROBES[@]}"; do
        probe_ok "$probe" || still+=("$probe")
    done
    ((${#still[@]} == 0)) || die "still missing after install: ${still[*]}"
fi

qemu-system-arm -machine help | grep -q '^mps2-an386 ' \
    || die "this qemu-system-arm has no mps2-an386 machine (need QEMU >= 6.0)"

echo "setup-cross: ok"
printf '  %-22s %s\n' \
    rustc "$(/usr/bin/rustc --version)" \
    cargo "$(/usr/bin/cargo --version)" \
    rust-src "$(readlink -f /usr/lib/rustlib/src/rust)" \
    ld.lld "$(ld.lld --version | head -n1)" \
    qemu-system-arm "$(qemu-system-arm --version | head -n1)" \
    qemu-aarch64 "$(qemu-aarch64 --version | head -n1)" \
    aarch64-linux-gnu-gcc "$(aarch64-linux-gnu-gcc --version | head -n1)"
