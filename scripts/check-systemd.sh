#!/usr/bin/env bash
# Checks the head-end systemd units (systemd/purselink-*.service):
#   1. every unit's ExecStart is exactly `/usr/bin/headend <role> --config /etc/purselink/<role>.toml`;
#   2. `systemd-analyze verify` is clean (exit 0 AND no output: it only warns on unknown keys);
#   3. `systemd-analyze security --offline=yes` rates the gateway unit 2.5 or lower;
#   4. a self-test: a unit with a bogus key must make step 2 fail, so the check can fail.
#
# verify refuses a unit whose ExecStart binary does not exist, and /usr/bin/headend is not
# installed on a build machine. So step 2 verifies copies of the units in a temp dir whose only
# change is ExecStart's path, pointed at the freshly built `headend` binary (verify --root needs
# a whole OS tree, which a build machine doesn't have). Step 1 guards what the copies changed.
#
# Usage: scripts/check-systemd.sh [path-to-headend [path-to-stbd]]
#   (default: builds them with cargo). `./dev test` and the attack suite pass the binaries the
#   test build made: a `cargo build -p` of one package unifies other features than the
#   workspace's test build, and rebuilt most dependencies (about 2 minutes on 2 cores).
set -euo pipefail

cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || { echo "check-systemd: systemd-analyze not found (apt-get install systemd)" >&2; exit 1; }

bin="${1:-}"
stbd="${2:-}"
if [[ -z "$bin" ]]; then
    cargo build -q -p headend --bin headend
    bin="$PWD/target/debug/headend"
fi
bin="$(realpath "$bin")"
[[ -x "$bin" ]] || { echo "check-systemd: $bin is not executable" >&2; exit 1; }

units=(systemd/purselink-*.service)
fail=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# 1. ExecStart as installed.
for u in "${units[@]}"; do
    role="$(basename "$u" .service)"
    role="${role#purselink-}"
    want="ExecStart=/usr/bin/headend $role --config /etc/purselink/$role.toml"
    got="$(grep '^ExecStart=' "$u" || true)"
    if [[ "$got" != "$want" ]]; then
        echo "FAIL $u: expected '$want', found '$got'"
        fail=1
    fi
done

# 2. verify (copies with ExecStart pointed at the built binary).
verify() {
    local out rc=0
    out="$(systemd-analyze verify "$@" 2>&1)" || rc=$?
    if [[ $rc -ne 0 || -n "$out" ]]; then
        printf '%s\n' "$out"
        return 1
    fi
}
mkdir -p "$tmp/units"
for u in "${units[@]}"; do
    sed "s|^ExecStart=/usr/bin/headend |ExecStart=$bin |" "$u" >"$tmp/units/$(basename "$u")"
done
if verify "$tmp"/units/*.service; then
    echo "ok   systemd-analyze verify: ${#units[@]} units clean"
else
    echo "FAIL systemd-analyze verify"
    fail=1
fi

# 3. security score of the gateway (the internet-facing role).
score="$(systemd-analyze security --offline=yes systemd/purselink-gateway.service 2>&1 |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
if [[ -z "$score" ]]; then
    echo "FAIL systemd-analyze security: no score printed"
    fail=1
elif awk -v s="$score" 'BEGIN { exit !(s <= 2.5) }'; then
    echo "ok   systemd-analyze security gateway: $score (<= 2.5)"
else
    echo "FAIL systemd-analyze security gateway: $score (> 2.5)"
    fail=1
fi
for u in "${units[@]}"; do
    s="$(systemd-analyze security --offline=yes "$u" 2>&1 |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
    echo "     $(basename "$u"): ${s:-?}"
done

# 4. self-test: the verify step must catch a broken unit.
# The set-top box unit: verified the same way, against a freshly built stbd.
if [[ -z "$stbd" ]]; then
    cargo build -q -p stb --bin stbd
    stbd="$PWD/target/debug/stbd"
fi
stbd="$(realpath "$stbd")"
[[ -x "$stbd" ]] || { echo "check-systemd: $stbd is not executable" >&2; exit 1; }
sed "s|^ExecStart=/usr/bin/stbd |ExecStart=$stbd |" systemd/stbd.service >"$tmp/stbd.service"
if verify "$tmp/stbd.service"; then
    s="$(systemd-analyze security --offline=yes systemd/stbd.service 2>&1 |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
    echo "ok   systemd-analyze verify: stbd.service clean (exposure ${s:-?})"
else
    echo "FAIL systemd-analyze verify stbd.service"
    fail=1
fi

mkdir -p "$tmp/broken"
sed 's/^UMask=/BogusDirective=yes\nUMask=/' "$tmp/units/purselink-gateway.service" >"$tmp/broken/purselink-gateway.service"
if verify "$tmp/broken/purselink-gateway.service" >/dev/null; then
    echo "FAIL self-test: verify did not notice a bogus directive"
    fail=1
else
    echo "ok   self-test: verify rejects a bogus directive"
fi

if [[ $fail -ne 0 ]]; then
    echo "check-systemd: FAILED"
    exit 1
fi
echo "check-systemd: all checks passed"
