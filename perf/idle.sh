#!/usr/bin/env bash
# Idle cost of a node: CPU time a running `cairn node run` (embedded default, all cores) uses
# over a window with no I/O, as a percentage of one core. Goal: under 1 %.
#   usage: perf/idle.sh [SECONDS]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
cargo build --release -j"$(nproc)" -q
dir=$(mktemp -d /var/tmp/cairn-idle.XXXXXX)
port=$((30000 + RANDOM % 1000))
./target/release/cairn node run --data-dir "$dir" --nbd-port "$port" \
  --grpc-port $((port + 1000)) --iscsi-port $((port + 2000)) --data-port $((port + 3000)) > "$dir/node.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do grep -q "cairn node: ready" "$dir/node.log" && break; sleep 0.1; done
grep -q "cairn node: ready" "$dir/node.log" || { cat "$dir/node.log"; exit 1; }
sleep 2
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
a=$(ticks); sleep "$secs"; b=$(ticks)
threads=$(ls "/proc/$pid/task" | wc -l)
pct=$(awk -v t=$((b - a)) -v hz="$hz" -v s="$secs" 'BEGIN { printf "%.3f", 100 * t / hz / s }')
echo "idle node: $((b - a)) ticks of CPU in ${secs} s (${hz} ticks/s) = ${pct} % of one core; $(nproc) cores, ${threads} threads"
