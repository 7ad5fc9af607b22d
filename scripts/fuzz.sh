#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: APDUs, the purse card, the purse layouts and
# the FCI, the PSAM, frames and wire messages, ATRs) for SECONDS each with cargo-fuzz on the
# nightly toolchain. A crash stops it with the input in fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs `rustup toolchain install nightly` and `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    # Not a process substitution: a missing cargo-fuzz must stop the script, not fuzz nothing.
    list=$(cargo +nightly fuzz list)
    mapfile -t targets <<<"$list"
fi
for t in "${targets[@]}"; do
    echo "== $t: ${SECS}s"
    cargo +nightly fuzz run "$t" -- -max_total_time="$SECS" -rss_limit_mb=1024 2>&1 | tail -3
done
