#!/usr/bin/env bash
# A Cairn node's NBD export against nbdkit's file plugin and against fio io_uring O_DIRECT on a
# file (the limit), side by side in one run: for each location (tmpfs and a disk directory),
# workload (4 KiB randwrite, randread) and queue depth (1, 32), the tools take turns; the table
# gives their IOPS, cairn's ratios to the limit and to nbdkit, and p99 latencies. Then it runs
# perf/idle.sh. See perf/README.md.
#
# Usage: perf/nbd.sh [--help]
# Environment (all optional):
#   RUNTIME=8             seconds of timed I/O per tool, cell and round
#   ROUNDS=3              turns per cell; the tool order rotates each round so no tool always
#                         follows another; the table shows medians, ratios are medians of
#                         per-round ratios with their range
#   SIZE=1GiB             working set (fio --size) and size of the nbdkit / limit file
#   DIRS="/dev/shm /var/tmp"   locations (SHM_DIR / DISK_DIR override one each)
#   QDS="1 32"  WORKLOADS="randwrite randread"
#   DEV_SIZE=4GiB         cairn device file (laid out fully, then `cairn device format`)
#   VDISK_SIZE=2GiB       cairn vdisk vd0 (the working set is its first SIZE bytes)
#   CORES=                cairn node --cores (default: the node's default, one per CPU)
#   NBDKIT_FUA=1          also run nbdkit with --filter=fua fuamode=force (every write
#                         fdatasync'd before its reply, durable like cairn's) on write cells
#   NBD_NULL=1            also run `nbdkit null` (discards writes, reads zeros): the NBD
#                         protocol, loopback TCP and fio's nbd engine with no storage behind
#   SETTLE_MAX=180        seconds to wait at most for a node to go idle (drain) after a run
#   IDLE_SECS=30          perf/idle.sh window (0: skip)
#   OUT=perf/results/nbd-<UTC date>.md   where the report goes
#   KEEP_FILES=0          1: keep data directories and files
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

RUNTIME="${RUNTIME:-8}"
ROUNDS="${ROUNDS:-3}"
SIZE="${SIZE:-1GiB}"
SHM_DIR="${SHM_DIR:-/dev/shm}"
DISK_DIR="${DISK_DIR:-/var/tmp}"
DIRS="${DIRS:-$SHM_DIR $DISK_DIR}"
QDS="${QDS:-1 32}"
WORKLOADS="${WORKLOADS:-randwrite randread}"
DEV_SIZE="${DEV_SIZE:-4GiB}"
VDISK_SIZE="${VDISK_SIZE:-2GiB}"
CORES="${CORES:-}"
NBDKIT_FUA="${NBDKIT_FUA:-1}"
NBD_NULL="${NBD_NULL:-1}"
SETTLE_MAX="${SETTLE_MAX:-180}"
IDLE_SECS="${IDLE_SECS:-30}"
KEEP_FILES="${KEEP_FILES:-0}"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
OUT="${OUT:-perf/results/nbd-$stamp.md}"

command_line="$(for v in RUNTIME ROUNDS SIZE DIRS QDS WORKLOADS DEV_SIZE VDISK_SIZE CORES NBDKIT_FUA NBD_NULL; do
  printf '%s=%q ' "$v" "${!v}"; done)perf/nbd.sh"

script=nbd.sh
# shellcheck source=perf/lib.sh
source "$root/perf/lib.sh"
for tool in cargo fio nbdkit python3 ss; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install fio nbdkit)"
done
fio --enghelp=io_uring >/dev/null 2>&1 || die "this fio has no io_uring engine"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
fio_size="${SIZE%iB}"; fio_size="${fio_size%B}"
dev_fio_size="${DEV_SIZE%iB}"; dev_fio_size="${dev_fio_size%B}"

lib_init

start_nbdkit() { # file fua(0|1|null) -> sets nbdkit_pid, nbdkit_port
  local file=$1 fua=$2 args=()
  nbdkit_port=$(free_port)
  case "$fua" in
    1) args=(--filter=fua file "$file" cache=none fuamode=force) ;;
    null) args=(null "size=${VDISK_SIZE%iB}") ;;  # nbdkit spells 2GiB as 2G
    *) args=(file "$file" cache=none) ;;
  esac
  nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$nbdkit_port" "${args[@]}" \
    >"$work/nbdkit-$fua.log" 2>&1 &
  nbdkit_pid=$!
  pids+=("$nbdkit_pid")
  wait_port "$nbdkit_port" "$nbdkit_pid" || { cat "$work/nbdkit-$fua.log" >&2; die "nbdkit did not start"; }
}

busy_before="$(cpu_busy)"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
results="$work/results.tsv"
notes=()
settles=()

for dir in $DIRS; do
  fstype="$(df --output=fstype "$dir" 2>/dev/null | tail -1 | tr -d " ")"
  loc="$dir ($fstype)"
  file="$dir/cairn-nbd-ref-$$.img"
  paths+=("$file")
  # O_DIRECT on tmpfs arrived in Linux 6.6; older kernels refuse the open with EINVAL.
  if ! dd if=/dev/zero of="$file" bs=4k count=1 oflag=direct status=none 2>"$work/dd.err"; then
    notes+=("$loc: O_DIRECT refused ($(tr -d '\n' <"$work/dd.err")): location skipped")
    echo "== $loc: O_DIRECT refused, skipped" >&2
    rm -f "$file"
    continue
  fi
  echo "== $loc: laying out the $SIZE reference file and the $DEV_SIZE cairn device" >&2
  layout "$file" "$fio_size"
  data="$(mktemp -d "$dir/cairn-nbd-node.XXXXXX")"
  paths+=("$data")
  layout "$data/dev0.img" "$dev_fio_size"
  "$bin" device format "$data/dev0.img" --slice-size 4KiB --tier ssd >"$work/format.log"
  start_node "$data"
  start_nbdkit "$file" 0; kit_pid=$nbdkit_pid; kit_port=$nbdkit_port
  kitfua_pid=""
  if [[ "$NBDKIT_FUA" == 1 ]]; then
    start_nbdkit "$file" 1; kitfua_pid=$nbdkit_pid; kitfua_port=$nbdkit_port
  fi
  null_pid=""
  if [[ "$NBD_NULL" == 1 ]]; then
    start_nbdkit "$file" null; null_pid=$nbdkit_pid; null_port=$nbdkit_port
  fi
  echo "== $loc: cairn node pid $node_pid on port $node_port, nbdkit $kit_port${kitfua_pid:+, nbdkit+fua $kitfua_port}" >&2

  for rw in $WORKLOADS; do
    if [[ "$rw" == *read ]]; then
      # Every block of the working set written (unwritten blocks read as zeros without I/O):
      # 1 MiB sequential writes, 8 in flight, take the direct (sequential) path to the extent
      # store; then wait for the drain of anything that went through the oplog.
      echo "== $loc: prefilling $SIZE of vd0 through NBD" >&2
      fio --name=prefill --ioengine=nbd --uri="nbd://127.0.0.1:$node_port/vd0" \
        --size="$fio_size" --bs=1M --rw=write --iodepth=8 --output-format=terse \
        --output="$work/prefill.out" >/dev/null 2>&1 || die "prefill failed"
      s=$(settle "$node_pid")
      notes+=("$loc: prefill for reads: node idle ${s} s after the sequential write")
    fi
    for qd in $QDS; do
      tools=(limit)
      [[ -n "$null_pid" ]] && tools+=(null)
      tools+=(nbdkit)
      [[ "$rw" == *write && -n "$kitfua_pid" ]] && tools+=(nbdkit-fua)
      tools+=(cairn)
      n=${#tools[@]}
      for round in $(seq "$ROUNDS"); do
        # Rotate the order each round.
        order=()
        for i in $(seq 0 $((n - 1))); do order+=("${tools[$(( (i + round - 1) % n ))]}"); done
        for tool in "${order[@]}"; do
          echo "== $loc $rw qd=$qd round $round: $tool" >&2
          cpu="-"; settle_s="-"; a=0; b=0; c=0
          case "$tool" in
            limit)
              out="$(run_fio "$rw" "$qd" --ioengine=io_uring --direct=1 --filename="$file")" ;;
            nbdkit|nbdkit-fua|null)
              case "$tool" in
                nbdkit) p=$kit_pid; port=$kit_port ;;
                nbdkit-fua) p=$kitfua_pid; port=$kitfua_port ;;
                null) p=$null_pid; port=$null_port ;;
              esac
              a=$(ticks "$p")
              out="$(run_fio "$rw" "$qd" --ioengine=nbd --uri="nbd://127.0.0.1:$port")"
              b=$(ticks "$p"); c=$b
              cpu=$(( (b - a) * 100 / hz / RUNTIME )) ;;
            cairn)
              a=$(ticks "$node_pid")
              out="$(run_fio "$rw" "$qd" --ioengine=nbd --uri="nbd://127.0.0.1:$node_port/vd0")"
              b=$(ticks "$node_pid")
              cpu=$(( (b - a) * 100 / hz / RUNTIME ))
              # Let the drain finish so it does not run during the next tool's turn; its CPU
              # counts in the per-I/O cost.
              settle_s=$(settle "$node_pid")
              c=$(ticks "$node_pid") ;;
          esac
          read -r iops p99 ios _ <<<"$out"
          us_io="-"
          [[ "$tool" != limit ]] && us_io=$(awk -v t=$((c - a)) -v hz="$hz" -v n="$ios" 'BEGIN { printf "%.1f", 1e6 * t / hz / n }')
          printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$loc" "$rw" "$qd" "$round" "$tool" \
            "$iops" "$p99" "$cpu" "$settle_s" "$us_io" >>"$results"
        done
      done
    done
  done
  grep -q "drain failed" "$data/node.log" && notes+=("$loc: the node log reports drain failures")
  stop_pid "$node_pid"
  tail -n 5 "$data/node.log" >"$work/node-tail.log"
  stop_pid "$kit_pid"
  [[ -n "$kitfua_pid" ]] && stop_pid "$kitfua_pid"
  [[ -n "$null_pid" ]] && stop_pid "$null_pid"
  if [[ "$KEEP_FILES" != 1 ]]; then rm -rf "$data" "$file"; fi
done

[[ -s "$results" ]] || die "no location could be measured"
busy_after="$(cpu_busy)"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

idle_line="(skipped)"
if [[ "$IDLE_SECS" != 0 ]]; then
  echo "== perf/idle.sh $IDLE_SECS" >&2
  # idle.sh builds and runs ./target/release/cairn: build that tree, not CARGO_TARGET_DIR's.
  idle_line="$(env -u CARGO_TARGET_DIR perf/idle.sh "$IDLE_SECS" 2>&1 | tail -n 1)"
fi

table="$(python3 - "$results" <<'PY'
import statistics, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
cells, order = defaultdict(lambda: defaultdict(dict)), []
for loc, rw, qd, rnd, tool, iops, p99, cpu, settle, us_io in rows:
    key = (loc, rw, int(qd))
    if key not in cells:
        order.append(key)
    num = lambda x: None if x == "-" else float(x)
    cells[key][int(rnd)][tool] = (float(iops), float(p99), num(cpu), num(settle), num(us_io))
fua = any("nbdkit-fua" in r for c in cells.values() for r in c.values())
null = any("null" in r for c in cells.values() for r in c.values())
med = statistics.median
head = ["location", "workload", "QD", "limit IOPS"] + (["nbdkit null IOPS"] if null else []) + ["nbdkit IOPS"]
if fua:
    head.append("nbdkit+FUA IOPS")
head += ["cairn IOPS", "cairn/limit", "cairn/nbdkit", "limit p99 µs", "nbdkit p99 µs"]
if fua:
    head.append("nbdkit+FUA p99 µs")
head += ["cairn p99 µs"]
print("| " + " | ".join(head) + " |")
print("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
goal, cpu_rows = [], []
def rng(xs):
    return f"{med(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})" if len(xs) > 1 else f"{xs[0]:.2f}"
for key in order:
    rs = list(cells[key].values())
    get = lambda tool, i: [r[tool][i] for r in rs if tool in r and r[tool][i] is not None]
    m = lambda tool, i, f="{:.0f}": f.format(med(get(tool, i))) if get(tool, i) else "–"
    rl = [r["cairn"][0] / r["limit"][0] for r in rs if r["limit"][0] > 0]
    rk = [r["cairn"][0] / r["nbdkit"][0] for r in rs if r["nbdkit"][0] > 0]
    line = [key[0], key[1], str(key[2]), m("limit", 0)] + ([m("null", 0)] if null else []) + [m("nbdkit", 0)]
    if fua:
        line.append(m("nbdkit-fua", 0))
    line += [m("cairn", 0), rng(rl), rng(rk), m("limit", 1), m("nbdkit", 1)]
    if fua:
        line.append(m("nbdkit-fua", 1))
    line.append(m("cairn", 1))
    print("| " + " | ".join(line) + " |")
    f1 = "{:.1f}"
    cpu_rows.append([key[0], key[1], str(key[2]), m("nbdkit", 2), m("nbdkit", 4, f1),
                     m("nbdkit-fua", 4, f1) if fua else None,
                     m("cairn", 2), m("cairn", 4, f1), m("cairn", 3)])
    if key[2] >= 32 and "tmpfs" in key[0]:
        ok = lambda x, g: f"{med(x):.2f}x " + ("(met)" if med(x) >= g else "(NOT met)")
        extra = ""
        if get("null", 0):
            rn = [r["null"][0] / r["limit"][0] for r in rs if "null" in r and r["limit"][0] > 0]
            rc = [r["cairn"][0] / r["null"][0] for r in rs if "null" in r and r["null"][0] > 0]
            extra = (f" (nbdkit null, which stores nothing, reaches {med(rn):.2f}x the limit; "
                     f"cairn is {med(rc):.2f}x nbdkit null)")
        goal.append(f"{key[0]} {key[1]} QD{key[2]}: {ok(rl, 0.7)} the limit, {ok(rk, 1.5)} nbdkit"
                    + extra)
print()
print("Goals, cairn >= 0.7x the limit and >= 1.5x nbdkit at QD32 on tmpfs: " + "; ".join(goal))
met = [f"{k[0].split()[0]} {k[1]} QD{k[2]}" for k in order
       if med([r["cairn"][0] / r["nbdkit"][0] for r in cells[k].values()]) >= 1.5]
print()
print("Cells where cairn >= 1.5x nbdkit: " + (", ".join(met) if met else "none"))
print()
h2 = ["location", "workload", "QD", "nbdkit CPU %", "nbdkit CPU µs/IO"] + \
     (["nbdkit+FUA CPU µs/IO"] if fua else []) + \
     ["cairn CPU %", "cairn CPU µs/IO (incl. drain)", "cairn idle after (s)"]
print("Server CPU (medians): % of one core during the timed run; CPU time per I/O (for cairn "
      "including the drain that ran on after the run); seconds the node needed after the run to "
      "go idle:")
print()
print("| " + " | ".join(h2) + " |")
print("|" + "|".join(["---"] * 3 + ["---:"] * (len(h2) - 3)) + "|")
for r in cpu_rows:
    print("| " + " | ".join(x for x in r if x is not None) + " |")
PY
)"

mkdir -p "$(dirname "$OUT")"
{
  echo "# NBD: cairn node vs nbdkit file plugin vs fio O_DIRECT, $stamp"
  echo
  echo "Command: \`$command_line\`"
  echo
  echo "| machine | |"
  echo "|---|---|"
  machine_rows
  echo "| nbdkit | $(nbdkit --version) |"
  for dir in $DIRS; do
    echo "| $dir | $(df --output=source,fstype "$dir" | tail -1 | tr -s ' ') |"
  done
  echo "| machine CPU busy (2 s sample) | before $busy_before, after $busy_after; load average before $load_before, after $load_after |"
  echo
  echo "Each cell: ${RUNTIME} s per tool, $ROUNDS round(s), tool order rotated every round, 4 KiB"
  echo "I/O over the first $SIZE. Every tool is driven by the same fio job: \`fio --bs=4k --rw=RW"
  echo "--iodepth=QD --size=$fio_size --runtime=$RUNTIME --time_based --norandommap --randrepeat=0"
  echo "--lat_percentiles=1\` plus:"
  echo
  echo "* **limit**: \`--ioengine=io_uring --direct=1 --filename=FILE\`, FILE a $SIZE file in the"
  echo "  location, fully written once (no holes)."
  echo "* **nbdkit**: \`--ioengine=nbd --uri=nbd://127.0.0.1:PORT\` against"
  echo "  \`nbdkit -f -i 127.0.0.1 -p PORT file FILE cache=none\` (the same FILE; 16 threads, the"
  echo "  default)."
  if [[ "$NBDKIT_FUA" == 1 ]]; then
    echo "* **nbdkit+FUA** (write cells): the same with \`--filter=fua ... fuamode=force\`: every"
    echo "  write is followed by \`fdatasync\` before its reply, like cairn's durable acks."
  fi
  if [[ "$NBD_NULL" == 1 ]]; then
    echo "* **nbdkit null**: the same nbd job against \`nbdkit -f -i 127.0.0.1 -p PORT null"
    echo "  size=${VDISK_SIZE%iB}\` (writes discarded, reads return zeros): the NBD protocol over"
    echo "  loopback TCP and fio's nbd engine (libnbd, one connection) with no storage at all: a"
    echo "  rough ceiling for NBD with this client on this machine (rough: a server with less"
    echo "  per-request overhead than nbdkit's thread pool can pass it, as cairn's reads do)."
  fi
  echo "* **cairn**: \`--ioengine=nbd --uri=nbd://127.0.0.1:PORT/vd0\` against \`cairn node run"
  echo "  --data-dir DIR --config DIR/node.toml\`: a fresh DIR in the location, device DIR/dev0.img"
  echo "  of $DEV_SIZE fully written once and formatted with \`cairn device format --slice-size 4KiB\`,"
  echo "  vdisk vd0 of $VDISK_SIZE, ${CORES:-default (one per CPU)} cores, other settings default"
  echo "  (oplog cap 6 GiB, read cache 256 MiB split over the cores). One node per location serves"
  echo "  every cell; after each cairn run the script waits until the node uses < 2 % of a core"
  echo "  (its drain finished) so the drain does not run during another tool's turn. Before the"
  echo "  read cells the first $SIZE of vd0 is written sequentially through NBD (1 MiB, 8 in flight)."
  echo
  echo "Latencies are fio's \`lat\` p99 (submission to completion, as the client sees it)."
  echo
  echo "$table"
  echo
  echo "Idle (\`perf/idle.sh $IDLE_SECS\`): \`$idle_line\`"
  for n in "${notes[@]}"; do echo; echo "Note: $n"; done
  echo
  echo "## Fairness"
  echo
  echo "* **Durability differs for writes.** cairn acknowledges a write only once it is durable:"
  echo "  its oplog batch is written and the device \`fdatasync\`ed (group commit) before the reply."
  echo "  The limit (fio O_DIRECT) and nbdkit never sync: their writes reach the file (or, on disk,"
  echo "  the device's volatile cache) but a power cut may lose them. nbdkit+FUA pays one"
  echo "  \`fdatasync\` per write and is the durable peer. On tmpfs \`fdatasync\` does nothing, so"
  echo "  there the difference is the cost of the call path only."
  echo "* **nbdkit $(nbdkit --version | awk '{print $2}') has no O_DIRECT.** \`cache=none\` (the only"
  echo "  page-cache option of this version's file plugin) opens the file \`O_RDWR\` without"
  echo "  \`O_DIRECT\` (checked with strace) and after each request calls \`sync_file_range\` (start"
  echo "  writeback of this write, wait for older ones) and \`posix_fadvise(DONTNEED)\` to drop the"
  echo "  pages. On disk that makes each write reach the device before long and keeps reads out of"
  echo "  the page cache (mostly: a read still goes through it); on tmpfs the page cache *is* the"
  echo "  storage, so \`cache=none\` changes nothing there and nbdkit does memory copies."
  echo "* cairn does more work per write than either peer: crc32c per 4 KiB, an oplog header per"
  echo "  batch, the block store's journal records, and later a drain (read back from the oplog,"
  echo "  written to the extent store, flushed, metadata committed). The drain's work is not fully"
  echo "  inside the timed window: the last column of the CPU table says how long it ran on."
  echo "* cairn's reads of the prefilled working set come from its extent store through a 128 MiB"
  echo "  per-core read cache (the 1 GiB working set does not fit; misses verify crc32c and fill"
  echo "  the cache). Reads of blocks still in the oplog are served from the oplog."
  echo "* All three run on the same 2 CPUs as the fio client; cairn's executor is pinned to CPU 0,"
  echo "  nothing else is pinned. On tmpfs io_uring cannot complete a read or write inline, so the"
  echo "  limit's and cairn's I/O go through io_uring worker threads (io-wq)."
  echo
  echo "<details><summary>Per-round results (location, workload, QD, round, tool, IOPS, p99 µs, server CPU %, node idle after s, server CPU µs per I/O)</summary>"
  echo
  echo '```'
  cat "$results"
  echo '```'
  echo
  echo "</details>"
} >"$OUT"

echo
echo "$table"
echo
echo "Idle: $idle_line"
for n in "${notes[@]}"; do echo "Note: $n"; done
echo
echo "Report: $OUT"
