#!/bin/bash
# payctl: one online MariaDB backup of this node into directory $1 (mariabackup + the binlogs since its position).
set -euo pipefail
umask 077
OUT="$1"
exec 9>>/var/backups/payctl/.backup.lock
flock -n 9 || { echo "another backup is running on this node (/var/backups/payctl/.backup.lock)" >&2; exit 75; }
mkdir -p "$OUT"
started=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
if ! mariadb-backup --defaults-file=/etc/payctl/backup/backup.cnf --backup --slave-info --target-dir="$OUT/base" \
    > "$OUT/mariabackup.log" 2>&1; then
  tail -n 15 "$OUT/mariabackup.log" >&2; exit 1
fi
finished=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
# mariadb_backup_binlog_info (xtrabackup_binlog_info before MariaDB 10.11.8): file, position, GTID.
info_file="$OUT/base/mariadb_backup_binlog_info"
[ -f "$info_file" ] || info_file="$OUT/base/xtrabackup_binlog_info"
read -r bfile bpos bgtid < "$info_file"
tar -C "$OUT" -cf - base | gzip -1 > "$OUT/base.tar.gz"
rm -rf "$OUT/base"
# Close the binlog being written, so every file copied is complete; the copy starts at the backup's own file.
mariadb --defaults-file=/etc/payctl/backup/backup.cnf -N -B -e 'FLUSH BINARY LOGS'
dir=$(dirname "$(mariadb --defaults-file=/etc/payctl/backup/backup.cnf -N -B -e 'SELECT @@log_bin_basename')")
mapfile -t logs < <(mariadb --defaults-file=/etc/payctl/backup/backup.cnf -N -B -e 'SHOW BINARY LOGS' | cut -f1)
mkdir -p "$OUT/binlogs"
copied=""
for ((i = 0; i < ${#logs[@]} - 1; i++)); do
  f=${logs[$i]}
  [[ "$f" < "$bfile" ]] && continue
  cp "$dir/$f" "$OUT/binlogs/$f"
  copied="$copied $f"
done
cd "$OUT"
sha256sum base.tar.gz binlogs/* > SHA256SUMS
stat -c '%s %n' base.tar.gz binlogs/* > SIZES
{
  echo "started=$started"
  echo "finished=$finished"
  echo "binlog_file=$bfile"
  echo "binlog_pos=$bpos"
  echo "gtid=$bgtid"
  echo "binlogs=${copied# }"
  echo "read_only=$(mariadb --defaults-file=/etc/payctl/backup/backup.cnf -N -B -e 'SELECT @@read_only')"
  echo "mariadb_version=$(mariadb --defaults-file=/etc/payctl/backup/backup.cnf -N -B -e 'SELECT VERSION()')"
  echo "payapp_version="
} > info
cat info
