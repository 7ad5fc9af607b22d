#!/bin/sh
# Installs the system packages Purselink's reader layer and its tests need on Debian/Ubuntu:
# pcscd + libpcsclite-dev (the PC/SC stack and the headers the `pcsc` crate links against),
# vsmartcard-vpcd (the virtual reader the `vcard` binary attaches to), opensc (opensc-tool,
# the third-party check that the virtual card is a correct ISO 7816-4 card), tmux (UI tests)
# pkg-config (used by pcsc-sys to find libpcsclite) and postgresql (initdb, pg_ctl: the
# head-end tests start a private PostgreSQL to run every role's journal on it).
#
# Installs only what is missing, so a re-run on a ready machine does nothing and needs no
# network. Exits non-zero with a message that says what to do when it cannot install.
set -eu

PACKAGES="pcscd libpcsclite-dev vsmartcard-vpcd opensc tmux pkg-config postgresql"

missing=""
for pkg in $PACKAGES; do
    # dpkg-query prints "install ok installed" only for a fully installed package.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing="$missing $pkg"
    fi
done

if [ -z "$missing" ]; then
    echo "system-setup: all packages present ($PACKAGES)"
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
