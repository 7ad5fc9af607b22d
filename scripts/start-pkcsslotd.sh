#!/bin/sh
# Starts openCryptoki's slot daemon (pkcsslotd) if it is not running, without systemd
# (containers, CI): the load server's PKCS#11 tests use openCryptoki's software token to
# show a token whose user PIN locks after wrong logins (SoftHSM2 never locks one).
# Idempotent: a running pkcsslotd is left alone. Needs root (its state is system-wide).
set -eu

if pgrep -x pkcsslotd >/dev/null 2>&1; then
    echo "start-pkcsslotd: pkcsslotd already running"
    exit 0
fi
if [ ! -x /usr/sbin/pkcsslotd ]; then
    echo "start-pkcsslotd: openCryptoki is not installed — run scripts/system-setup.sh as root" >&2
    exit 1
fi
getent group pkcs11 >/dev/null 2>&1 || groupadd -r pkcs11
mkdir -p /run/opencryptoki /var/lib/opencryptoki
chgrp pkcs11 /run/opencryptoki /var/lib/opencryptoki 2>/dev/null || true
/usr/sbin/pkcsslotd
for _ in 1 2 3 4 5 6 7 8 9 10; do
    pgrep -x pkcsslotd >/dev/null 2>&1 && { echo "start-pkcsslotd: pkcsslotd running"; exit 0; }
    sleep 0.5
done
echo "start-pkcsslotd: pkcsslotd did not start" >&2
exit 1
