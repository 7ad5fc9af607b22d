#!/usr/bin/env bash
# The Purselink demo on one machine: the head end all-in-one on SQLite, a virtual purse card
# on a real pcscd through vsmartcard's vpcd, and stbd with its TV UI in this terminal.
# Everything lives in $PURSELINK_DEMO_DIR (default ./demo); delete it to start over.
#
#   scripts/demo.sh              interactive: you are the viewer, the keyboard is the remote
#   scripts/demo.sh --scripted   buys a movie and loads the card without you (tmux drives the
#                                real TUI), prints a summary, exits 0 only if all of it worked
#
# Called by `./dev demo` after the system setup. Without pcscd (not root, no apt) it falls
# back to the in-process virtual card and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=${PURSELINK_DEMO_DIR:-$PWD/demo}
PORT=${PURSELINK_DEMO_PORT:-4433}
BIN=$PWD/target/debug
SCRIPTED=0
[ "${1:-}" = "--scripted" ] && SCRIPTED=1

say() { printf '== %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

say "building headend, stbd and vcard (debug build; the first build takes a few minutes)"
cargo build --quiet -p headend -p stb -p reader-drivers --bins

READER=${PURSELINK_DEMO_READER:-pcsc}
if [ "$READER" = pcsc ] && ! [ -S /run/pcscd/pcscd.comm ]; then
    say "pcscd is not running: using the in-process virtual card instead of PC/SC"
    READER=virtual
fi

if [ ! -f "$DEMO/headend.toml" ]; then
    say "creating the demo deployment in $DEMO"
    "$BIN/headend" init-demo --dir "$DEMO" --listen "127.0.0.1:$PORT" >/dev/null
    "$BIN/headend" pki issue-device --ca "$DEMO/ca" --box-id box-000001 --out "$DEMO/box" 2>/dev/null
    "$BIN/vcard" create --card "$DEMO/card.plvc" --card-id 4711 --balance 2000 --max-balance 50000 \
        --expiry 2030-12 --issuer-keys "$DEMO/issuer-keys.toml" >/dev/null
fi
if [ "$READER" = pcsc ]; then
    READER_TOML='kind = "pcsc"
name = "Virtual PCD 00 00"'
else
    READER_TOML="kind = \"virtual\"
card_file = \"$DEMO/card.plvc\""
fi
VOUCHER=$(tr -d '[:space:]' < "$DEMO/demo-voucher.txt")
# stbd.toml names the voucher code (the voucher's only secret): owner-only, like every secret file.
umask 077
cat > "$DEMO/stbd.toml" <<EOF
# Written by scripts/demo.sh; config/stbd.example.toml documents every key.
[reader]
$READER_TOML

[headend]
address = "127.0.0.1:$PORT"
server_name = "localhost"
operator_ca = "$DEMO/ca/ca.crt.pem"
device_cert = "$DEMO/box/box-000001.crt.pem"
device_key = "$DEMO/box/box-000001.key.pem"

[state]
dir = "$DEMO/stb-state"

[ui]
enabled = true
provider_name = "Purselink demo"

[local_api]
enabled = false

[load]
bank_account = "ACC-0001"
voucher = "$VOUCHER"
pin_key = "$DEMO/pin-keys/box-000001.key"
EOF

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

say "starting the head end (log: $DEMO/headend.log)"
"$BIN/headend" all-in-one --config "$DEMO/headend.toml" >>"$DEMO/headend.log" 2>&1 &
PIDS+=($!)
if [ "$READER" = pcsc ]; then
    say "attaching the virtual card to pcscd's reader \"Virtual PCD 00 00\" (log: $DEMO/vcard.log)"
    "$BIN/vcard" attach-vpcd --card "$DEMO/card.plvc" >>"$DEMO/vcard.log" 2>&1 &
    PIDS+=($!)
fi
sleep 1
for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || die "a demo process exited at start; see $DEMO/*.log"; done

PIN=$(tr -d '[:space:]' < "$DEMO/demo-pin.txt")

if [ "$SCRIPTED" = 0 ]; then
    cat <<EOF

  Purselink demo. The keyboard is the remote:
    F1 catalog · F2 load · F3 card history · F4 info · arrows · Enter = OK · Esc = BACK · q quits
  Bank account PIN: ${PIN:-see $DEMO/demo-pin.txt}    Voucher: ${VOUCHER:-see $DEMO/demo-voucher.txt}

EOF
    read -r -p "Press Enter to start the TV UI..." _ || true
    "$BIN/stbd" run --config "$DEMO/stbd.toml" 2>>"$DEMO/stbd.log"
    exit 0
fi

# ---- scripted: tmux drives the real TUI ----
command -v tmux >/dev/null || die "tmux is not installed (scripts/system-setup.sh installs it)"
SOCK=purselink-demo-$$
T="tmux -L $SOCK"
$T new-session -d -s demo -x 80 -y 24 "$BIN/stbd run --config $DEMO/stbd.toml 2>>$DEMO/stbd.log"
trap '$T kill-server 2>/dev/null || true; cleanup' EXIT

screen() { $T capture-pane -p -t demo 2>/dev/null || true; }
wait_for() { # wait_for TEXT SECONDS
    local i=0
    while [ "$i" -lt $(($2 * 10)) ]; do
        screen | grep -q -- "$1" && return 0
        sleep 0.1; i=$((i + 1))
    done
    printf 'demo: timed out waiting for "%s"; the screen was:\n' "$1" >&2
    screen >&2
    return 1
}
keys() { $T send-keys -t demo "$@"; sleep 0.3; }
balance() { "$BIN/vcard" info --card "$DEMO/card.plvc" | sed -n 's/^balance \([^ ]*\).*/\1/p'; }

BEFORE=$(balance)
wait_for "Balance" 20
say "buying a pay-per-view movie"
keys F1
wait_for "Pay-per-view" 10
keys Enter
wait_for "Confirm purchase" 10
keys Enter
wait_for "New balance" 20
PURCHASE=$(screen | grep -E "Purchase complete|Enjoy|Order|Amount|Reference" | tr -s ' ║╔╗╚╝═' ' ' | sed 's/^ *//' | uniq || true)
keys Enter
AFTER_PURCHASE=$(balance)

say "loading the card from the bank account"
keys F2
wait_for "Load from:" 10
keys Enter
wait_for "Maximum" 20
keys 5 0 0
keys Enter
wait_for "Enter your PIN" 10
for d in $(echo "$PIN" | grep -o .); do keys "$d"; done
keys Enter
wait_for "New balance" 30
LOAD=$(screen | grep -E "Value loaded|Amount|Reference" | tr -s ' ║╔╗╚╝═' ' ' | sed 's/^ *//' | uniq || true)
AFTER_LOAD=$(balance)

$T kill-server 2>/dev/null || true
cat <<EOF

== Purselink scripted demo: summary
card balance before:         $BEFORE
after the purchase:          $AFTER_PURCHASE
after the load:              $AFTER_LOAD
purchase receipt on the TV:
$(printf '%s\n' "$PURCHASE" | sed 's/^/    /')
load result on the TV:
$(printf '%s\n' "$LOAD" | sed 's/^/    /')
journals:
$("$BIN/headend" status --config "$DEMO/headend.toml" | sed 's/^/    /')
EOF
[ "$BEFORE" != "$AFTER_PURCHASE" ] && [ "$AFTER_PURCHASE" != "$AFTER_LOAD" ] || die "balances did not move as expected"
say "scripted demo passed"
