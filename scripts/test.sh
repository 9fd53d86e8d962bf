#!/usr/bin/env bash
# The project's test command: fetches the real models the tests use (idempotent), then runs every
# test of the workspace. A missing model makes its test fail, never skip.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
cargo test --workspace "$@"
