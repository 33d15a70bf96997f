#!/usr/bin/env bash
# RF2 vs RF1 on a 3-node local cluster (scripts/cluster.sh, release build): 4 KiB random writes
# through NBD (fio's nbd engine) to an RF1 vdisk and to an RF2 vdisk of the same cluster, at QD1
# (latency p50/p99) and QD32 (IOPS). An RF2 write is acknowledged only when it is durable in
# the owner's oplog and in its replica's, which is on another node (another process, over the
# loopback TCP transport, onto another device file). Both vdisks are written the same way; the
# ratio is the cost of the second copy.
#
#   usage: perf/replication.sh         (writes perf/results/replication-<UTC>.md)
# Environment: RUNTIME (s per cell, default 20), DIR_BASE (where the nodes' device files go,
#   default /var/tmp: the disk; /dev/shm for tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${RUNTIME:-20}
base=${DIR_BASE:-/var/tmp}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
out=perf/results/replication-$stamp.md
dir=$(mktemp -d "$base/cairn-repl-perf.XXXXXX")
export CAIRN_CLUSTER_DIR=$dir/cluster CAIRN_BIN=$PWD/target/release/cairn
export CAIRN_CLUSTER_BASE_PORT=$((17000 + RANDOM % 2000))
cleanup() {
  local status=$?
  if [[ $status != 0 ]]; then
    for f in "$dir"/cluster/n*/log; do echo "== $f" >&2; tail -n 20 "$f" >&2; done
  fi
  bash scripts/cluster.sh down >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

command -v fio >/dev/null || { echo "fio is required (scripts/setup.sh)"; exit 1; }
command -v nbdinfo >/dev/null || { echo "nbdinfo is required (scripts/setup.sh)"; exit 1; }
cargo build --release -j"$(nproc)" -q --bin cairn
fsync=$(fio --name=fsync --directory="$dir" --rw=write --bs=4k --size=16M --fdatasync=1 \
  --output-format=json 2>/dev/null | python3 -c '
import json,sys
j=json.load(sys.stdin)["jobs"][0]["sync"]["lat_ns"]["percentile"]
print("%.3f/%.3f" % (j["50.000000"]/1e6, j["99.000000"]/1e6))')

bash scripts/cluster.sh up 3 >/dev/null
endpoints=$(bash scripts/cluster.sh endpoints)
ip_of() { echo "127.0.0.$(($1 + 1))"; }
owner_of() { # vdisk -> NBD address of the node serving it
  local i
  for _ in $(seq 600); do
    for i in 1 2 3; do
      if nbdinfo --list "nbd://$(ip_of "$i")" 2>/dev/null | grep -q "export=\"$1\""; then
        echo "$(ip_of "$i")"
        return
      fi
    done
    sleep 0.2
  done
  echo "no node serves $1" >&2
  exit 1
}
# vd0 (RF2) is created by node 1 (only while the cluster has no container: wait for it); vd1
# goes into an RF1 container.
rf2=$(owner_of vd0)
for _ in $(seq 100); do
  "$CAIRN_BIN" container create single --rf 1 --endpoint "$endpoints" >/dev/null 2>&1 && break
  sleep 0.5
done
for _ in $(seq 100); do
  "$CAIRN_BIN" vdisk create vd1 --container single --size 1GiB --endpoint "$endpoints" \
    >/dev/null 2>&1 && break
  sleep 0.5
done
rf1=$(owner_of vd1)
replica=$(grep -h "vdisk vd0 replicated to nodes" "$dir"/cluster/n*/log | tail -1)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

cell() { # label host vdisk qd -> table row
  local label=$1 host=$2 vd=$3 qd=$4
  fio --name="$label-qd$qd" --ioengine=nbd --uri="nbd://$host/$vd" --rw=randwrite --bs=4k \
    --size=512M --iodepth="$qd" --runtime="$runtime" --time_based --norandommap \
    --randrepeat=0 --lat_percentiles=1 --output-format=json --output="$dir/fio.json" \
    >"$dir/fio.err" 2>&1 \
    || { cat "$dir/fio.err" >&2; exit 1; }
  python3 - "$dir/fio.json" "$label" "$qd" <<'PY'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
p = w["lat_ns"]["percentile"]
print(f'{sys.argv[2]} {sys.argv[3]} {w["iops"]:.0f} {p["50.000000"]/1e3:.1f} {p["99.000000"]/1e3:.1f}')
PY
}

results=()
for qd in 1 32; do
  results+=("$(cell RF1 "$rf1" vd1 "$qd")")
  results+=("$(cell RF2 "$rf2" vd0 "$qd")")
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
printf '%s\n' "${results[@]}"

table=$(python3 - "${results[@]}" <<'PY'
import sys
rows = [r.split() for r in sys.argv[1:]]
by = {(r[0], r[1]): r for r in rows}
out = ["| QD | RF1 IOPS | RF2 IOPS | RF2/RF1 IOPS | RF1 p50 µs | RF2 p50 µs | RF2/RF1 p50 | RF1 p99 µs | RF2 p99 µs | RF2/RF1 p99 |",
       "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for qd in ("1", "32"):
    a, b = by[("RF1", qd)], by[("RF2", qd)]
    ia, ib, pa, pb, qa, qb = (float(x) for x in (a[2], b[2], a[3], b[3], a[4], b[4]))
    out.append(f"| {qd} | {ia:.0f} | {ib:.0f} | {ib/ia:.2f} | {pa:.1f} | {pb:.1f} | {pb/pa:.2f} | {qa:.1f} | {qb:.1f} | {qb/qa:.2f} |")
print("\n".join(out))
PY
)
echo "$table"
{
  echo "# RF2 vs RF1 4 KiB random writes, 3-node local cluster, $stamp"
  echo
  echo "Command: \`RUNTIME=$runtime DIR_BASE=$base perf/replication.sh\` at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!perf' || echo ' + uncommitted changes')"
  echo
  echo "| machine | |"
  echo "|---|---|"
  echo "| CPUs | $(nproc) |"
  echo "| kernel | $(uname -r) |"
  echo "| device files on | $base ($(df --output=fstype "$base" | tail -1)), fdatasync p50/p99 $fsync ms |"
  echo "| load average before / after | $load_before / $load_after |"
  echo
  echo "Three \`cairn node run\` processes (scripts/cluster.sh: one core each, unpinned, 4 GiB device"
  echo "file each). vd0 is in the RF2 container the cluster was created with, served by $rf2 ($replica);"
  echo "vd1 is in an RF1 container, served by $rf1. fio: \`--ioengine=nbd --rw=randwrite --bs=4k"
  echo "--size=512M --iodepth=QD --runtime=$runtime --time_based --norandommap\`, one job, one connection."
  echo
  echo "$table"
} >"$out"
echo "wrote $out"
