#!/usr/bin/env bash
# A Cairn node's iSCSI target against Debian's tgt (tgtd, rdwr backing store with O_DIRECT) on
# the same file and against fio io_uring O_DIRECT on that file (the limit), side by side in one
# run: for each location (tmpfs and a disk directory), workload (4 KiB randwrite, randread) and
# queue depth (1, 32), the tools take turns; the table gives their IOPS, cairn's ratios to tgt
# and to the limit, and p99 latencies. The iSCSI client is fio's libiscsi engine (Debian's fio
# is built without it: the script builds fio from Debian's source package once, see FIO_ISCSI);
# read cells are also measured with libiscsi's iscsi-perf. See perf/README.md.
#
# Usage: perf/iscsi.sh [--help]
# Environment (all optional):
#   RUNTIME=15            seconds of timed I/O per tool, cell and round
#   ROUNDS=2              turns per cell; the tool order rotates each round; the table shows
#                         medians, ratios are medians of per-round ratios with their range
#   SIZE=1GiB             working set (fio --size) and size of the tgt / limit file
#   DIRS="/dev/shm /var/tmp"   locations (SHM_DIR / DISK_DIR override one each)
#   QDS="1 32"  WORKLOADS="randwrite randread"
#   DEV_SIZE=4GiB         cairn device file (laid out fully, then `cairn device format`)
#   VDISK_SIZE=2GiB       cairn vdisk vd0 (the working set is its first SIZE bytes)
#   CORES=                cairn node --cores (default: the node's default, one per CPU)
#   ISCSI_PERF=1          also drive the read cells with iscsi-perf (libiscsi-bin)
#   FIO_ISCSI=            a fio binary with the libiscsi engine; default: the one built from
#                         Debian's fio source package into FIO_ISCSI_CACHE (built if missing)
#   FIO_ISCSI_CACHE=~/.cache/cairn-perf/fio-libiscsi
#   TGT_THREADS=16        tgtd --nr_iothreads (tgt's default)
#   SETTLE_MAX=180        seconds to wait at most for a node to go idle (drain) after a run
#   OUT=perf/results/iscsi-<UTC date>.md   where the report goes
#   KEEP_FILES=0          1: keep data directories and files
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

RUNTIME="${RUNTIME:-15}"
ROUNDS="${ROUNDS:-2}"
SIZE="${SIZE:-1GiB}"
SHM_DIR="${SHM_DIR:-/dev/shm}"
DISK_DIR="${DISK_DIR:-/var/tmp}"
DIRS="${DIRS:-$SHM_DIR $DISK_DIR}"
QDS="${QDS:-1 32}"
WORKLOADS="${WORKLOADS:-randwrite randread}"
DEV_SIZE="${DEV_SIZE:-4GiB}"
VDISK_SIZE="${VDISK_SIZE:-2GiB}"
CORES="${CORES:-}"
ISCSI_PERF="${ISCSI_PERF:-1}"
FIO_ISCSI="${FIO_ISCSI:-}"
FIO_ISCSI_CACHE="${FIO_ISCSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cairn-perf/fio-libiscsi}"
TGT_THREADS="${TGT_THREADS:-16}"
SETTLE_MAX="${SETTLE_MAX:-180}"
KEEP_FILES="${KEEP_FILES:-0}"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
OUT="${OUT:-perf/results/iscsi-$stamp.md}"

command_line="$(for v in RUNTIME ROUNDS SIZE DIRS QDS WORKLOADS DEV_SIZE VDISK_SIZE CORES ISCSI_PERF TGT_THREADS; do
  printf '%s=%q ' "$v" "${!v}"; done)perf/iscsi.sh"

script=iscsi.sh
# shellcheck source=perf/lib.sh
source "$root/perf/lib.sh"
for tool in cargo fio tgtd tgtadm iscsi-perf iscsi-readcapacity16 python3 ss; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install fio tgt libiscsi-bin)"
done
fio --enghelp=io_uring >/dev/null 2>&1 || die "this fio has no io_uring engine"
fio_size="${SIZE%iB}"; fio_size="${fio_size%B}"
dev_fio_size="${DEV_SIZE%iB}"; dev_fio_size="${dev_fio_size%B}"

# Debian's fio is configured without libiscsi (pitfall 7 in DEPENDENCIES.md). Build the same
# version from Debian's source package with --enable-libiscsi, once, into FIO_ISCSI_CACHE. The
# source comes through apt with the system's own sources turned into deb-src entries in a
# private list directory (the system's apt configuration is left alone).
build_fio_iscsi() {
  local dest=$1 src apt_dir f
  echo "== building fio with the libiscsi engine from Debian's source package into $dest" >&2
  if ! dpkg -s libiscsi-dev >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || die "libiscsi-dev is missing (apt-get install libiscsi-dev)"
    apt-get install -y libiscsi-dev >&2
  fi
  src="$(mktemp -d)"
  apt_dir="$src/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/parts"
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e "$f" ]] && sed 's/^Types:.*/Types: deb-src/' "$f" >"$apt_dir/parts/$(basename "$f")"
  done
  if [[ -f /etc/apt/sources.list ]]; then
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$apt_dir/parts/main.list"
  fi
  local opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/parts"
    -o "Dir::State::Lists=$apt_dir/lists")
  apt-get "${opts[@]}" update >&2
  (cd "$src" && apt-get "${opts[@]}" source "fio=$(dpkg-query -W -f='${Version}' fio)" >&2 \
    || apt-get "${opts[@]}" source fio >&2)
  local tree
  tree="$(find "$src" -maxdepth 1 -type d -name 'fio-*' | head -1)"
  [[ -n "$tree" ]] || die "apt-get source fio produced no tree"
  (cd "$tree" && ./configure --enable-libiscsi --disable-native >&2 && make -j2 >&2)
  "$tree/fio" --enghelp=libiscsi >/dev/null 2>&1 || die "the fio built in $tree has no libiscsi engine"
  mkdir -p "$(dirname "$dest")"
  cp "$tree/fio" "$dest"
  rm -rf "$src"
}
if [[ -z "$FIO_ISCSI" ]]; then
  FIO_ISCSI="$FIO_ISCSI_CACHE/fio-$(fio --version | sed 's/^fio-//')"
  [[ -x "$FIO_ISCSI" ]] || build_fio_iscsi "$FIO_ISCSI"
fi
"$FIO_ISCSI" --enghelp=libiscsi >/dev/null 2>&1 || die "$FIO_ISCSI has no libiscsi engine"

lib_init

# fio's filename syntax needs ':' escaped.
iscsi_filename() { echo "${1//:/\\:}"; } # iscsi://host:port/iqn/lun

# tgtd in the foreground on its own management socket and a free loopback portal, one target
# with the file as LUN 1 (LUN 0 is tgt's controller), rdwr backing store, O_DIRECT; sets
# tgt_pid, tgt_port, tgt_cp, tgt_url.
start_tgt() { # file
  local file=$1
  tgt_port=$(free_port)
  tgt_cp=$((1000 + RANDOM % 30000))
  tgtd -f -C "$tgt_cp" -t "$TGT_THREADS" --iscsi "portal=127.0.0.1:$tgt_port" \
    >"$work/tgtd.log" 2>&1 &
  tgt_pid=$!
  pids+=("$tgt_pid")
  cleanups+=("stop_tgt $tgt_cp $tgt_pid")
  wait_port "$tgt_port" "$tgt_pid" || { cat "$work/tgtd.log" >&2; die "tgtd did not start"; }
  local iqn=iqn.2026-11.io.cairn.perf:tgt
  tgtadm -C "$tgt_cp" --lld iscsi --op new --mode target --tid 1 -T "$iqn"
  tgtadm -C "$tgt_cp" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 \
    -b "$file" --bstype rdwr --bsoflags direct
  tgtadm -C "$tgt_cp" --lld iscsi --op bind --mode target --tid 1 -I ALL
  tgtadm -C "$tgt_cp" --lld iscsi --op show --mode target >"$work/tgt-show.txt"
  grep -q "Backing store flags: direct" "$work/tgt-show.txt" || die "tgt LUN is not O_DIRECT"
  tgt_url="iscsi://127.0.0.1:$tgt_port/$iqn/1"
}

# tgtd ignores SIGTERM: remove the target, then ask the daemon to exit; KILL as the fallback.
# Once per daemon: the exit trap calls it again for every tgtd started, stopped or not.
stop_tgt() { # control_port pid
  local p known=0
  for p in "${pids[@]}"; do [[ "$p" == "$2" ]] && known=1; done
  (( known )) || return 0
  tgtadm -C "$1" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
  tgtadm -C "$1" --op delete --mode system >/dev/null 2>&1 || true
  for _ in $(seq 50); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$2" 2>/dev/null || true
  wait "$2" 2>/dev/null || true
  forget_pid "$2"
  rm -f "/var/run/tgtd/socket.$1" "/var/run/tgtd/socket.$1.lock"
}

# iscsi-perf random reads of 4 KiB with QD requests in flight for RUNTIME s (it runs until
# SIGINT and prints its average) -> "iops - ios -".
run_iscsi_perf() { # url qd
  local url=$1 qd=$2 bs blocks out
  bs=$(iscsi-readcapacity16 "$url" | awk -F: '/LOGICAL BLOCK LENGTH/ {gsub(/ /, "", $2); print $2; exit}')
  [[ "$bs" =~ ^[0-9]+$ ]] || die "no block length from iscsi-readcapacity16 $url"
  blocks=$((4096 / bs))
  timeout -s INT "$RUNTIME" iscsi-perf -r -m "$qd" -b "$blocks" "$url" >"$work/iperf.out" 2>&1 || true
  out=$(tr '\r' '\n' <"$work/iperf.out" | grep -o 'iops average [0-9]*' | tail -1 | awk '{print $3}')
  [[ -n "$out" ]] || { cat "$work/iperf.out" >&2; die "iscsi-perf printed no average"; }
  echo "$out - $((out * RUNTIME)) -"
}

busy_before="$(cpu_busy)"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
results="$work/results.tsv"
notes=()

for dir in $DIRS; do
  fstype="$(df --output=fstype "$dir" 2>/dev/null | tail -1 | tr -d " ")"
  loc="$dir ($fstype)"
  file="$dir/cairn-iscsi-ref-$$.img"
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
  data="$(mktemp -d "$dir/cairn-iscsi-node.XXXXXX")"
  paths+=("$data")
  layout "$data/dev0.img" "$dev_fio_size"
  "$bin" device format "$data/dev0.img" --slice-size 4KiB --tier ssd >"$work/format.log"
  start_node "$data"
  start_tgt "$file"
  cairn_url="iscsi://127.0.0.1:$node_iscsi_port/iqn.2026-11.io.cairn:vd0/0"
  echo "== $loc: cairn node pid $node_pid, iSCSI port $node_iscsi_port; tgtd pid $tgt_pid, port $tgt_port" >&2

  for rw in $WORKLOADS; do
    if [[ "$rw" == *read ]]; then
      # Every block of the working set written (unwritten blocks read as zeros without I/O):
      # 1 MiB sequential writes, 8 in flight, take the direct (sequential) path to the extent
      # store; then wait for the drain of anything that went through the oplog. tgt's file was
      # laid out fully already.
      echo "== $loc: prefilling $SIZE of vd0 through iSCSI" >&2
      "$FIO_ISCSI" --name=prefill --ioengine=libiscsi --filename="$(iscsi_filename "$cairn_url")" \
        --size="$fio_size" --bs=1M --rw=write --iodepth=8 --output-format=terse \
        --output="$work/prefill.out" >/dev/null 2>&1 || { cat "$work/prefill.out" >&2; die "prefill failed"; }
      s=$(settle "$node_pid")
      notes+=("$loc: prefill for reads: node idle ${s} s after the sequential write")
    fi
    for qd in $QDS; do
      tools=(limit tgt cairn)
      [[ "$rw" == randread && "$ISCSI_PERF" == 1 ]] && tools+=(tgt-iscsiperf cairn-iscsiperf)
      n=${#tools[@]}
      for round in $(seq "$ROUNDS"); do
        order=()
        for i in $(seq 0 $((n - 1))); do order+=("${tools[$(( (i + round - 1) % n ))]}"); done
        for tool in "${order[@]}"; do
          echo "== $loc $rw qd=$qd round $round: $tool" >&2
          cpu="-"; settle_s="-"; a=0; b=0; c=0
          case "$tool" in
            limit)
              out="$(run_fio "$rw" "$qd" --ioengine=io_uring --direct=1 --filename="$file")" ;;
            tgt|tgt-iscsiperf)
              a=$(ticks "$tgt_pid")
              if [[ "$tool" == tgt ]]; then
                out="$(FIO="$FIO_ISCSI" run_fio "$rw" "$qd" --ioengine=libiscsi --filename="$(iscsi_filename "$tgt_url")")"
              else
                out="$(run_iscsi_perf "$tgt_url" "$qd")"
              fi
              b=$(ticks "$tgt_pid"); c=$b
              cpu=$(( (b - a) * 100 / hz / RUNTIME )) ;;
            cairn|cairn-iscsiperf)
              a=$(ticks "$node_pid")
              if [[ "$tool" == cairn ]]; then
                out="$(FIO="$FIO_ISCSI" run_fio "$rw" "$qd" --ioengine=libiscsi --filename="$(iscsi_filename "$cairn_url")")"
              else
                out="$(run_iscsi_perf "$cairn_url" "$qd")"
              fi
              b=$(ticks "$node_pid")
              cpu=$(( (b - a) * 100 / hz / RUNTIME ))
              # Let the drain finish so it does not run during the next tool's turn; its CPU
              # counts in the per-I/O cost.
              settle_s=$(settle "$node_pid")
              c=$(ticks "$node_pid") ;;
          esac
          read -r iops p99 ios client_us <<<"$out"
          us_io="-"
          [[ "$tool" != limit ]] && us_io=$(awk -v t=$((c - a)) -v hz="$hz" -v n="$ios" 'BEGIN { printf "%.1f", 1e6 * t / hz / n }')
          printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$loc" "$rw" "$qd" "$round" "$tool" \
            "$iops" "$p99" "$cpu" "$settle_s" "$us_io" "$client_us" >>"$results"
        done
      done
    done
  done
  grep -q "drain failed" "$data/node.log" && notes+=("$loc: the node log reports drain failures")
  stop_pid "$node_pid"
  stop_tgt "$tgt_cp" "$tgt_pid"
  if [[ "$KEEP_FILES" != 1 ]]; then rm -rf "$data" "$file"; fi
done

[[ -s "$results" ]] || die "no location could be measured"
busy_after="$(cpu_busy)"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

table="$(python3 - "$results" <<'PY'
import statistics, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
cells, order = defaultdict(lambda: defaultdict(dict)), []
for loc, rw, qd, rnd, tool, iops, p99, cpu, settle, us_io, client_us in rows:
    key = (loc, rw, int(qd))
    if key not in cells:
        order.append(key)
    num = lambda x: None if x == "-" else float(x)
    cells[key][int(rnd)][tool] = (float(iops), num(p99), num(cpu), num(settle), num(us_io),
                                  num(client_us))
med = statistics.median
ip = any("cairn-iscsiperf" in r for c in cells.values() for r in c.values())
def rng(xs):
    if not xs:
        return "–"
    return f"{med(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})" if len(xs) > 1 else f"{xs[0]:.2f}"
def ratios(rs, a, b):
    return [r[a][0] / r[b][0] for r in rs if a in r and b in r and r[b][0] > 0]
head = ["location", "workload", "QD", "limit IOPS", "tgt IOPS", "cairn IOPS", "cairn/tgt",
        "cairn/limit", "limit p99 µs", "tgt p99 µs", "cairn p99 µs"]
if ip:
    head += ["tgt IOPS (iscsi-perf)", "cairn IOPS (iscsi-perf)", "cairn/tgt (iscsi-perf)"]
print("| " + " | ".join(head) + " |")
print("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
goal, cpu_rows = [], []
for key in order:
    rs = list(cells[key].values())
    get = lambda tool, i: [r[tool][i] for r in rs if tool in r and r[tool][i] is not None]
    m = lambda tool, i, f="{:.0f}": f.format(med(get(tool, i))) if get(tool, i) else "–"
    rt, rl = ratios(rs, "cairn", "tgt"), ratios(rs, "cairn", "limit")
    line = [key[0], key[1], str(key[2]), m("limit", 0), m("tgt", 0), m("cairn", 0), rng(rt),
            rng(rl), m("limit", 1), m("tgt", 1), m("cairn", 1)]
    if ip:
        line += [m("tgt-iscsiperf", 0), m("cairn-iscsiperf", 0),
                 rng(ratios(rs, "cairn-iscsiperf", "tgt-iscsiperf"))]
    print("| " + " | ".join(line) + " |")
    f1 = "{:.1f}"
    cpu_rows.append([key[0], key[1], str(key[2]), m("limit", 5, f1), m("tgt", 5, f1),
                     m("cairn", 5, f1), m("tgt", 2), m("tgt", 4, f1), m("cairn", 2),
                     m("cairn", 4, f1), m("cairn", 3)])
    if key[2] == 32 and rt:
        goal.append(f"{key[0]} {key[1]} QD32: {med(rt):.2f}x tgt "
                    f"({'met' if med(rt) >= 2.5 else 'NOT met'})")
print()
print("Goal, cairn >= 2.5x tgt's IOPS at QD32 (fio libiscsi): " + ("; ".join(goal) or "no QD32 cell"))
print()
h2 = ["location", "workload", "QD", "fio CPU µs/IO: limit", "fio CPU µs/IO: tgt",
      "fio CPU µs/IO: cairn", "tgt CPU %", "tgt CPU µs/IO", "cairn CPU %",
      "cairn CPU µs/IO (incl. drain)", "cairn idle after (s)"]
print("CPU (medians, fio runs): the client's (fio's user + system time per I/O; with the libiscsi "
      "engine this is the initiator); the server's % of one core during the timed run and CPU "
      "time per I/O (for cairn including the drain that ran on after the run); seconds the node "
      "needed after the run to go idle. On this 2-core machine client and server share the CPUs, "
      "so a server's IOPS are bounded near 2 cores / (client + server µs per I/O):")
print()
print("| " + " | ".join(h2) + " |")
print("|" + "|".join(["---"] * 3 + ["---:"] * (len(h2) - 3)) + "|")
for r in cpu_rows:
    print("| " + " | ".join(r) + " |")
PY
)"

mkdir -p "$(dirname "$OUT")"
{
  echo "# iSCSI: cairn node vs tgt (O_DIRECT) vs fio O_DIRECT, $stamp"
  echo
  echo "Command: \`$command_line\`"
  echo
  echo "| machine | |"
  echo "|---|---|"
  machine_rows
  echo "| fio with libiscsi | $("$FIO_ISCSI" --version), \`$FIO_ISCSI\` (Debian source package, \`--enable-libiscsi\`) |"
  echo "| libiscsi | $(dpkg-query -W -f='${Version}' libiscsi7 2>/dev/null || echo '?') |"
  echo "| tgt | $(tgtd -V 2>&1 | head -1) ($(dpkg-query -W -f='${Version}' tgt 2>/dev/null || echo '?')) |"
  for dir in $DIRS; do
    echo "| $dir | $(df --output=source,fstype "$dir" | tail -1 | tr -s ' ') |"
  done
  echo "| machine CPU busy (2 s sample) | before $busy_before, after $busy_after; load average before $load_before, after $load_after |"
  echo
  echo "Each cell: ${RUNTIME} s per tool, $ROUNDS round(s), tool order rotated every round, 4 KiB"
  echo "random I/O over the first $SIZE. fio job for every fio tool: \`fio --bs=4k --rw=RW"
  echo "--iodepth=QD --size=$fio_size --runtime=$RUNTIME --time_based --norandommap --randrepeat=0"
  echo "--lat_percentiles=1\` plus:"
  echo
  echo "* **limit**: Debian's fio, \`--ioengine=io_uring --direct=1 --filename=FILE\`, FILE a $SIZE"
  echo "  file in the location, fully written once (no holes)."
  echo "* **tgt**: fio with libiscsi, \`--ioengine=libiscsi --filename=iscsi\\://127.0.0.1\\:PORT/IQN/1\`"
  echo "  against \`tgtd -f -C CP -t $TGT_THREADS --iscsi portal=127.0.0.1:PORT\` with one target whose"
  echo "  LUN 1 is the same FILE: \`tgtadm --op new --mode logicalunit --tid 1 --lun 1 -b FILE"
  echo "  --bstype rdwr --bsoflags direct\` (pread/pwrite with O_DIRECT on $TGT_THREADS I/O threads)."
  echo "* **cairn**: the same fio libiscsi job against \`iscsi://127.0.0.1:PORT/iqn.2026-11.io.cairn:vd0/0\`"
  echo "  served by \`cairn node run --data-dir DIR --config DIR/node.toml\`: a fresh DIR in the"
  echo "  location, device DIR/dev0.img of $DEV_SIZE fully written once and formatted with"
  echo "  \`cairn device format --slice-size 4KiB\`, vdisk vd0 of $VDISK_SIZE, ${CORES:-default (one per CPU)}"
  echo "  cores, other settings default. One node per location serves every cell; after each cairn"
  echo "  run the script waits until the node uses < 2 % of a core (its drain finished). Before the"
  echo "  read cells the first $SIZE of vd0 is written sequentially through iSCSI (1 MiB, 8 in flight)."
  if [[ "$ISCSI_PERF" == 1 ]]; then
    echo "* **iscsi-perf** columns (read cells): \`iscsi-perf -r -m QD -b 4096/BLOCK URL\` for"
    echo "  $RUNTIME s (stopped with SIGINT; its \"iops average\"), against the same two targets: a"
    echo "  second libiscsi client, which only reads."
  fi
  echo
  echo "randwrite through iSCSI is driven by fio's libiscsi engine (iscsi-perf only reads)."
  echo "Latencies are fio's \`lat\` p99 (submission to completion, as the client sees it)."
  echo
  echo "$table"
  for n in "${notes[@]}"; do echo; echo "Note: $n"; done
  echo
  echo "## Fairness"
  echo
  echo "* **Durability differs for writes.** cairn acknowledges a write only once it is durable"
  echo "  (oplog batch written and the device \`fdatasync\`ed, group commit). tgt with"
  echo "  \`--bsoflags direct\` writes each block with O_DIRECT \`pwrite\` and does not sync (it"
  echo "  syncs only on SYNCHRONIZE CACHE or FUA, which fio does not send); the limit never syncs."
  echo "  On tmpfs \`fdatasync\` does nothing."
  echo "* cairn does more work per write: crc32c, the oplog, and later a drain into the extent"
  echo "  store (the CPU table's last column is how long it ran on after the timed run)."
  echo "* All run on the same 2 CPUs as the client; cairn's executor is pinned to CPU 0, tgtd and"
  echo "  the client are not pinned."
  echo "* O_DIRECT on tmpfs is accepted since Linux 6.6 (this kernel: $(uname -r)); the script"
  echo "  checks with \`dd oflag=direct\` and skips a location that refuses it. On tmpfs there is no"
  echo "  device: every tool's I/O is a memory copy, and io_uring runs it on io-wq worker threads."
  echo "* fio prints \"both iodepth >= 1 and synchronous I/O engine are selected, queue depth will be"
  echo "  capped at 1\" for the libiscsi engine (it is flagged FIO_SYNCIO), but the engine queues"
  echo "  asynchronously: at --iodepth=32 fio's IO depths histogram is mostly 16-32 (checked by hand)."
  echo
  echo "<details><summary>Per-round results (location, workload, QD, round, tool, IOPS, p99 µs, server CPU %, node idle after s, server CPU µs per I/O, client CPU µs per I/O)</summary>"
  echo
  echo '```'
  cat "$results"
  echo '```'
  echo
  echo "</details>"
} >"$OUT"

echo
echo "$table"
for n in "${notes[@]}"; do echo "Note: $n"; done
echo
echo "Report: $OUT"
