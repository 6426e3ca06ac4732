#!/usr/bin/env bash
# ceph-down.sh - stop the daemons started by ceph-up.sh, using only the pid
# files under $BASE/run (default /var/tmp/celer-ceph/run). A pid is only signalled
# if its command line references $BASE/ceph.conf (so a reused pid is never
# hit). OSDs first, then mgr, then mon.
#   ./ceph-down.sh          stop daemons, keep data (ceph-up.sh restarts them)
#   ./ceph-down.sh --purge  stop daemons and delete all cluster data
set -uo pipefail
BASE=${BASE:-/var/tmp/celer-ceph}
CONF=$BASE/ceph.conf
PURGE=0
[ "${1:-}" = --purge ] && PURGE=1

log() { printf '[ceph-down %(%H:%M:%S)T] %s\n' -1 "$*"; }

ours() {  # $1 pid
  [ -d "/proc/$1" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "$CONF"
}

stop_one() {  # $1 pid file
  local f=$1 n pid i
  n=$(basename "$f" .pid)
  pid=$(cat "$f" 2>/dev/null) || return 0
  if [ -z "$pid" ] || ! ours "$pid"; then
    log "$n: not running (stale pid file)"; rm -f "$f"; return 0
  fi
  log "$n: SIGTERM $pid"
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 1 60); do
    ours "$pid" || { rm -f "$f"; return 0; }
    sleep 0.5
  done
  log "$n: still alive after 30s, SIGKILL $pid"
  kill -KILL "$pid" 2>/dev/null
  sleep 1
  rm -f "$f"
}

shopt -s nullglob
for f in "$BASE"/run/osd.*.pid; do stop_one "$f" & done
wait
for f in "$BASE"/run/mgr.*.pid "$BASE"/run/mon.*.pid; do stop_one "$f"; done

if [ "$PURGE" = 1 ]; then
  log "purging cluster data under $BASE"
  rm -rf "$BASE/mon" "$BASE/mgr" "$BASE/osd" "$BASE/run" "$BASE/log" \
         "$BASE/crash" "$BASE/monmap" "$BASE/mon.keyring" \
         "$BASE/ceph.client.admin.keyring" "$CONF" "$BASE/.cluster-created"
fi
log done
