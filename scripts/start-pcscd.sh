#!/bin/sh
# Starts pcscd if it is not already running, without systemd (containers, CI), and waits
# until its socket accepts clients. Idempotent: a running pcscd is left alone.
#
# pcscd runs in the foreground under setsid so its log goes to a file rather than to a syslog
# that containers usually lack. Environment:
#   PCSCD_LOG    log file (default /tmp/pcscd.log)
#   PCSCD_DEBUG  set to 1 for --debug --apdu logging
#   PCSCD_WAIT   seconds to wait for the socket (default 10)
set -eu

SOCKET=/run/pcscd/pcscd.comm
PIDFILE=/run/pcscd/pcscd.pid
LOG=${PCSCD_LOG:-/tmp/pcscd.log}
WAIT=${PCSCD_WAIT:-10}

running() {
    [ -S "$SOCKET" ] || return 1
    [ -r "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

if running; then
    echo "start-pcscd: pcscd already running (pid $(cat "$PIDFILE"))"
    exit 0
fi

if ! command -v pcscd >/dev/null 2>&1 && [ ! -x /usr/sbin/pcscd ]; then
    echo "start-pcscd: pcscd is not installed — run scripts/system-setup.sh as root" >&2
    exit 1
fi
PCSCD=$(command -v pcscd 2>/dev/null || echo /usr/sbin/pcscd)

if [ "$(id -u)" -ne 0 ]; then
    echo "start-pcscd: pcscd must be started as root (it owns /run/pcscd) — run: sudo $0" >&2
    exit 1
fi

# A pid file or socket left by a pcscd that died would make the new one refuse to start.
if [ -e "$PIDFILE" ] || [ -e "$SOCKET" ]; then
    echo "start-pcscd: removing stale $PIDFILE / $SOCKET"
    rm -f "$PIDFILE" "$SOCKET"
fi

set -- --foreground
if [ "${PCSCD_DEBUG:-0}" = 1 ]; then
    set -- "$@" --debug --apdu
fi
echo "start-pcscd: starting $PCSCD $*, log in $LOG"
setsid "$PCSCD" "$@" >>"$LOG" 2>&1 </dev/null &

i=0
while [ "$i" -lt $((WAIT * 10)) ]; do
    if running; then
        echo "start-pcscd: pcscd running (pid $(cat "$PIDFILE")), socket $SOCKET"
        exit 0
    fi
    sleep 0.1
    i=$((i + 1))
done

echo "start-pcscd: pcscd did not create $SOCKET within ${WAIT}s — last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
