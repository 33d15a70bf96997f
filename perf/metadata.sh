#!/usr/bin/env bash
# Metadata commit throughput and latency on a 3-node local cluster (scripts/cluster.sh, release
# build): `cairn bench metadata` drives batched block-map updates through the gRPC metadata
# service at several batch sizes and concurrencies; fio measures the fdatasync latency of the
# same filesystem (a commit costs at least one log fsync on the leader and one on a follower,
# in sequence, plus the state machine's own commit).
#
#   usage: perf/metadata.sh            (writes perf/results/metadata-<UTC>.md)
# Environment: RUNTIME (s per cell, default 10), CELLS ("batch:concurrency[:cas] ...").
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${RUNTIME:-10}
cells=${CELLS:-"1:1 1:8 1:32 64:1 64:8 64:32 64:8:cas 256:8"}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
out=perf/results/metadata-$stamp.md
dir=$(mktemp -d /var/tmp/cairn-meta-perf.XXXXXX)
export CAIRN_CLUSTER_DIR=$dir/cluster CAIRN_BIN=$PWD/target/release/cairn CAIRN_CLUSTER_MODE=controlplane
export CAIRN_CLUSTER_BASE_PORT=$((17000 + RANDOM % 2000))
cleanup() { bash scripts/cluster.sh down >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT

cargo build --release -j"$(nproc)" -q
command -v fio >/dev/null || { echo "fio is required (scripts/setup.sh)"; exit 1; }
fsync_p50=$(fio --name=fsync --directory="$dir" --rw=write --bs=4k --size=16M --fdatasync=1 \
  --output-format=json 2>/dev/null | python3 -c '
import json,sys
j=json.load(sys.stdin)["jobs"][0]["sync"]["lat_ns"]["percentile"]
print("%.3f/%.3f" % (j["50.000000"]/1e6, j["99.000000"]/1e6))')

bash scripts/cluster.sh up 3 >/dev/null
endpoints=$(bash scripts/cluster.sh endpoints)
for _ in $(seq 100); do
  "$CAIRN_BIN" cluster status --endpoint "$endpoints" --json 2>/dev/null |
    python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if all(g["leader"] and len(g["voters"])==3 for g in s["groups"]) else 1)' \
    && break
  sleep 0.3
done
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

rows=""
for cell in $cells; do
  IFS=: read -r batch conc cas <<<"$cell"
  flags=(--endpoint "$endpoints" --batch "$batch" --concurrency "$conc" --runtime "$runtime" --json)
  [[ "$cas" == cas ]] && flags+=(--cas)
  json=$("$CAIRN_BIN" bench metadata "${flags[@]}")
  echo "$json"
  rows+=$(python3 -c '
import json,sys
j=json.loads(sys.argv[1]); l=j["lat_ms"]
print("| %d | %d | %s | %.0f | %.0f | %.2f | %.2f | %.2f | %d |" % (j["batch"], j["concurrency"],
  "CAS" if j["cas"] else "put", j["batches_per_s"], j["keys_per_s"], l["p50"], l["p99"], l["max"], j["errors"]))' "$json")$'\n'
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

{
  echo "# Metadata commit throughput and latency, 3-node local cluster, $stamp"
  echo
  echo "Command: \`RUNTIME=$runtime CELLS=\"$cells\" perf/metadata.sh\`"
  echo
  echo "| machine | |"
  echo "|---|---|"
  echo "| nproc | $(nproc) |"
  echo "| kernel | $(uname -r) |"
  echo "| cairn | $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + uncommitted changes') |"
  echo "| filesystem of the raft logs | $(df -T "$dir" | awk 'NR==2{print $2" on "$1}') |"
  echo "| fdatasync 4 KiB p50/p99 ms (fio, same filesystem) | $fsync_p50 |"
  echo "| load average before / after | $load_before / $load_after |"
  echo
  echo "Cluster: \`scripts/cluster.sh up 3\` (release \`cairn controlplane run\`, one process"
  echo "per node on its own loopback address, 4 metadata shards, every group 3 voters, every"
  echo "raft write fsynced by redb). Client: \`cairn bench metadata --endpoint <all 3>"
  echo "--batch B --concurrency C --runtime $runtime [--cas]\` — C tasks, each applying batches of B"
  echo "block-map entries (10-byte values) under its own vdisks' prefixes (one shard per batch),"
  echo "latency from the call to its return; \`put\` = Expect::Any, \`CAS\` = Expect::Version of"
  echo "the key's last write."
  echo
  echo "| batch | concurrency | mode | batches/s | keys/s | p50 ms | p99 ms | max ms | errors |"
  echo "|---:|---:|---|---:|---:|---:|---:|---:|---:|"
  printf "%s" "$rows"
} >"$out"
cat "$out"
echo "written: $out"
