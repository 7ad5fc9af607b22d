#!/usr/bin/env bash
# The cost of a security card in a PC/SC reader (the PSAM through pcscd and vsmartcard's
# vpcd, issue 16) against the software security card, measured in the same run: the same
# head end (all-in-one, one terminal, FIG. 5 embodiment so the terminal is held only for
# the draw), the same boxes (`loadgen drive`), first with the software terminal, then with
# the PSAM in "Purselink PSAM 00 01" (vpcd port 35966). Prints each run's figures and the
# ratio of purchases per second.
#
#   scripts/bench-psam.sh [SECONDS] [CONCURRENCY]
#
# Needs pcscd with the Purselink PSAM readers (scripts/system-setup.sh) and a build:
# `cargo build --release -p headend -p reader-drivers -p sim` (PROFILE=debug to use the
# debug binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${1:-20}
CONC=${2:-4}
BIN=${CARGO_TARGET_DIR:-target}/${PROFILE:-release}
for b in headend vcard loadgen; do
    [ -x "$BIN/$b" ] || { echo "bench-psam: $BIN/$b missing: build it first" >&2; exit 2; }
done
sh scripts/start-pcscd.sh >/dev/null
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The boxes buy as fast as they can: lift the gateway's per-box offer rate.
unlimit() { printf '\n[gateway.limits]\noffers_per_minute = 1000000\nburst = 100000\n' >>"$1"; }

# A demo deployment in $work/$1 on a free port: sets dir and port.
deploy() {
    dir="$work/$1"
    port=$((20000 + RANDOM % 20000))
    "$BIN/headend" init-demo --dir "$dir" --listen "127.0.0.1:$port" --embodiment payment-server >/dev/null
}

drive() { # $1: label, $2: security_cards TOML value; the deployment is $dir/$port
    sed -i "s|^security_cards = .*|security_cards = $2|" "$dir/headend.toml"
    unlimit "$dir/headend.toml"
    "$BIN/headend" all-in-one --config "$dir/headend.toml" --log warn >"$work/$1.log" 2>&1 &
    local he=$!
    pids+=("$he")
    sleep 4
    echo "== $1: $2"
    "$BIN/loadgen" drive --gateway "127.0.0.1:$port" --ca-dir "$dir/ca" \
        --issuer-keys "$dir/issuer-keys.toml" --boxes "$CONC" --concurrency "$CONC" \
        --seconds "$SECONDS_RUN" --warmup 2 | tee "$work/$1.out"
    kill "$he"; wait "$he" 2>/dev/null || true
}

deploy software
drive software '[{ kind = "software", id = 0x5A110002 }]'
# The PSAM, personalised with its deployment's purchase keys (init-demo makes new ones).
deploy psam
"$BIN/vcard" create-psam --psam "$work/psam.plsc" --id 0x5A110001 --purchase-keys "$dir/keys/purchase-keys.toml" >/dev/null
"$BIN/vcard" attach-vpcd --psam "$work/psam.plsc" --port 35966 >"$work/vcard.log" 2>&1 &
pids+=("$!")
sleep 2
drive psam '[{ kind = "pcsc", id = 0x5A110001, reader = "Purselink PSAM 00 01", timeout_ms = 3000 }]'
rate() { grep -oE '[0-9]+(\.[0-9]+)? purchases/s' "$1" | head -1 | cut -d' ' -f1; }
s=$(rate "$work/software.out"); p=$(rate "$work/psam.out")
if [ -n "$s" ] && [ -n "$p" ]; then
    echo "== PSAM / software purchases per second: $p / $s = $(awk "BEGIN{printf \"%.3f\", $p/$s}")"
else
    echo "== could not read the rates (see the output above)"
fi
