#!/bin/bash
# payctl: daily MariaDB backup of this node into /var/backups/payctl/<ID>, keeping at most 7
# within 18000000000 bytes (0: no limit; the plan's backups disk item). The newest is always kept.
set -euo pipefail
umask 077
DIR=/var/backups/payctl

once() {
  mkdir -p "$DIR"
  id=$(date -u +%Y%m%dT%H%M%SZ)
  bash /etc/payctl/backup/backup.sh "$DIR/$id" > /dev/null
  used=0
  n=0
  for d in $(ls -1d "$DIR"/[0-9]*T*Z 2>/dev/null | sort -r); do
    size=$(du -sb "$d" | cut -f1)
    if [ "$n" -eq 0 ] || { [ "$n" -lt 7 ] && [ $((used + size)) -le 18000000000 ]; }; then
      n=$((n + 1))
      used=$((used + size))
    else
      rm -rf "$d"
    fi
  done
  echo "backup $id done; $n kept ($used bytes)"
}

loop() {
  while true; do
    now=$(date -u +%s)
    next=$(date -u -d "today 18:30" +%s)
    [ "$next" -gt "$now" ] || next=$(date -u -d "tomorrow 18:30" +%s)
    sleep $((next - now))
    once || echo "scheduled backup failed (exit $?)" >&2
  done
}

case "${1:-once}" in
  once) once ;;
  loop) loop ;;
  *) echo "usage: $0 once|loop" >&2; exit 2 ;;
esac
