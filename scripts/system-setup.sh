#!/bin/sh
# Installs the system packages Purselink's reader layer and its tests need on Debian/Ubuntu:
# pcscd + libpcsclite-dev (the PC/SC stack and the headers the `pcsc` crate links against),
# vsmartcard-vpcd (the virtual reader the `vcard` binary attaches to), opensc (opensc-tool,
# the third-party check that the virtual card is a correct ISO 7816-4 card), tmux (UI tests)
# pkg-config (used by pcsc-sys to find libpcsclite) and postgresql (initdb, pg_ctl: the
# head-end tests start a private PostgreSQL to run every role's journal on it) and softhsm2
# (the load server's HSM as a PKCS#11 token in the tests) and opencryptoki (a software token
# whose user PIN locks after wrong logins, for the locked-token test).
#
# Installs only what is missing, so a re-run on a ready machine does nothing and needs no
# network. Exits non-zero with a message that says what to do when it cannot install.
set -eu

PACKAGES="pcscd libpcsclite-dev vsmartcard-vpcd opensc tmux pkg-config postgresql softhsm2 opencryptoki"

missing=""
for pkg in $PACKAGES; do
    # dpkg-query prints "install ok installed" only for a fully installed package.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing="$missing $pkg"
    fi
done

# The payment server's security-card readers: a second vpcd entry ("Purselink PSAM 00 00"
# on port 35965, "… 00 01" on 35966) with a driver instance of its own — a copy of the
# vpcd driver, since entries that share one instance mix up their slots (a card served on
# 35965 showed up in "Virtual PCD 00 00"). pcscd reads it at start: restarted if running.
psam_readers() {
    lib=/usr/lib/pcsc/drivers/serial/libifdvpcd.so
    own=/usr/lib/pcsc/drivers/serial/libifdvpcd-purselink-psam.so
    conf=/etc/reader.conf.d/purselink-psam
    [ -f "$lib" ] || return 0
    if [ -f "$own" ] && [ -f "$conf" ] && cmp -s "$lib" "$own"; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "system-setup: the security-card readers need root — run: sudo $0" >&2
        return 1
    fi
    cp "$lib" "$own"
    cat >"$conf" <<CONF
# Purselink: the payment server's security-card (PSAM) readers, vpcd on ports 35965/35966,
# with a driver instance of their own (entries sharing one instance mix up their slots).
# Written by scripts/system-setup.sh.
FRIENDLYNAME "Purselink PSAM"
DEVICENAME   /dev/null:0x8C7D
LIBPATH      $own
CHANNELID    0x8C7D
CONF
    echo "system-setup: security-card readers added ($conf)"
    if [ -r /run/pcscd/pcscd.pid ] && kill "$(cat /run/pcscd/pcscd.pid)" 2>/dev/null; then
        echo "system-setup: pcscd stopped to read them; it starts again on demand or with scripts/start-pcscd.sh"
        sleep 1
    fi
}

if [ -z "$missing" ]; then
    echo "system-setup: all packages present ($PACKAGES)"
    psam_readers
    exit 0
fi

echo "system-setup: missing:$missing"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-setup: apt-get not found — this script supports Debian/Ubuntu only;" >&2
    echo "  install these packages with your system's package manager:$missing" >&2
    exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "system-setup: must run as root to install packages — run: sudo $0" >&2
    echo "  (or install them yourself: apt-get install$missing)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086 # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $missing
echo "system-setup: installed:$missing"
psam_readers
