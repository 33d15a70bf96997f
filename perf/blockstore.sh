#!/usr/bin/env bash
# BlockStore's slice path against fio (io_uring, O_DIRECT) on the same file, side by side in one
# run: for each location (tmpfs and a disk directory), workload (4 KiB randwrite, randread) and
# queue depth (1, 32), fio and `cairn bench blockstore` take turns on one backing file; the table
# gives both IOPS, their ratio and both p99 latencies. See perf/README.md.
#
# Usage: perf/blockstore.sh [--help]
# Environment (all optional):
#   RUNTIME=5             seconds of timed I/O per tool, cell and round
#   ROUNDS=3              turns per cell (fio first in odd rounds, cairn first in even ones);
#                         the table shows medians, the ratio is the median of per-round ratios
#   SIZE=1GiB             backing file size (fio --size and cairn --size)
#   DIRS="/dev/shm /var/tmp"   backing locations (SHM_DIR / DISK_DIR override one each)
#   QDS="1 32"  WORKLOADS="randwrite randread"
#   CPU=                  pin both tools to this CPU (fio --cpus_allowed, cairn --cpu)
#   DEVICE_LAYER=0        1: also run `cairn bench blockstore --layer device` (io_uring device
#                         under the store, no checksums or journal) and show its IOPS
#   OUT=perf/results/blockstore-<UTC date>.md   where the report goes
#   KEEP_FILES=0          1: keep the backing files
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

RUNTIME="${RUNTIME:-5}"
ROUNDS="${ROUNDS:-3}"
SIZE="${SIZE:-1GiB}"
SHM_DIR="${SHM_DIR:-/dev/shm}"
DISK_DIR="${DISK_DIR:-/var/tmp}"
DIRS="${DIRS:-$SHM_DIR $DISK_DIR}"
QDS="${QDS:-1 32}"
WORKLOADS="${WORKLOADS:-randwrite randread}"
CPU="${CPU:-}"
DEVICE_LAYER="${DEVICE_LAYER:-0}"
KEEP_FILES="${KEEP_FILES:-0}"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
OUT="${OUT:-perf/results/blockstore-$stamp.md}"

command_line="$(for v in RUNTIME ROUNDS SIZE DIRS QDS WORKLOADS CPU DEVICE_LAYER; do
  printf '%s=%q ' "$v" "${!v}"; done)perf/blockstore.sh"

die() { echo "blockstore.sh: $*" >&2; exit 1; }
for tool in cargo fio python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh installs fio)"
done
fio --enghelp=io_uring >/dev/null 2>&1 || die "this fio has no io_uring engine"
# fio takes 1GiB as 1GiB; cairn's parser takes the same spellings.
fio_size="${SIZE%iB}"; fio_size="${fio_size%B}"

echo "== building cairn (release)" >&2
cargo build --release -j2 --bin cairn >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/cairn"
[[ -x "$bin" ]] || die "no binary at $bin"

work="$(mktemp -d)"
files=()
cleanup() {
  if [[ "$KEEP_FILES" != 1 ]]; then
    for f in "${files[@]}"; do rm -f "$f"; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# CPU busy share of the whole machine over 2 s: other tenants make every number noisier.
cpu_busy() {
  python3 - <<'PY'
import time
def snap():
    v = list(map(int, open('/proc/stat').readline().split()[1:]))
    return sum(v), v[3] + v[4]
t0, i0 = snap(); time.sleep(2); t1, i1 = snap()
print(f"{100 * (1 - (i1 - i0) / max(1, t1 - t0)):.0f}%")
PY
}

busy_before="$(cpu_busy)"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
results="$work/results.tsv"
notes=()
fio_cpu=(); cairn_cpu=()
if [[ -n "$CPU" ]]; then fio_cpu=(--cpus_allowed="$CPU"); cairn_cpu=(--cpu "$CPU"); fi

run_fio() { # file rw qd -> "iops p99_us"
  fio --name="fio-$2-qd$3" --filename="$1" --size="$fio_size" --bs=4k --rw="$2" \
    --ioengine=io_uring --direct=1 --iodepth="$3" --runtime="$RUNTIME" --time_based \
    --norandommap --randrepeat=0 --lat_percentiles=1 "${fio_cpu[@]}" --output-format=json \
    >"$work/fio.json"
  python3 - "$work/fio.json" "$2" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
d = job["write" if sys.argv[2].endswith("write") else "read"]
if d.get("total_ios", 1) == 0 or job.get("error", 0):
    sys.exit(f"fio did no I/O (error {job.get('error')})")
print(f'{d["iops"]:.0f} {d["lat_ns"]["percentile"]["99.000000"] / 1e3:.1f}')
PY
}

run_cairn() { # file rw qd layer -> "iops p99_us"
  "$bin" bench blockstore --path "$1" --rw "$2" --qd "$3" --runtime "$RUNTIME" \
    --size "$SIZE" --layer "$4" "${cairn_cpu[@]}" --json >"$work/cairn.json"
  python3 - "$work/cairn.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f'{r["iops"]:.0f} {r["lat_ns"]["p99"] / 1e3:.1f}')
PY
}

for dir in $DIRS; do
  fstype="$(df --output=fstype "$dir" 2>/dev/null | tail -1 | tr -d " ")"
  loc="$dir ($fstype)"
  file="$dir/cairn-perf-$$.img"
  files+=("$file")
  # O_DIRECT on tmpfs arrived in Linux 6.6; older kernels refuse the open with EINVAL.
  if ! dd if=/dev/zero of="$file" bs=4k count=1 oflag=direct status=none 2>"$work/dd.err"; then
    notes+=("$loc: O_DIRECT refused ($(tr -d '\n' <"$work/dd.err")): location skipped")
    echo "== $loc: O_DIRECT refused, skipped" >&2
    continue
  fi
  echo "== $loc: laying out $SIZE (fully written, so no run meets holes or unwritten extents)" >&2
  fio --name=layout --filename="$file" --size="$fio_size" --bs=1M --rw=write \
    --ioengine=io_uring --direct=1 --iodepth=8 --output-format=terse >/dev/null
  for rw in $WORKLOADS; do
    for qd in $QDS; do
      for round in $(seq "$ROUNDS"); do
        tools=(fio cairn)
        if (( round % 2 == 0 )); then tools=(cairn fio); fi
        [[ "$DEVICE_LAYER" == 1 ]] && tools+=(device)
        for tool in "${tools[@]}"; do
          echo "== $loc $rw qd=$qd round $round: $tool" >&2
          case "$tool" in
            fio) out="$(run_fio "$file" "$rw" "$qd")" ;;
            cairn) out="$(run_cairn "$file" "$rw" "$qd" store)" ;;
            device) out="$(run_cairn "$file" "$rw" "$qd" device)" ;;
          esac
          printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$loc" "$rw" "$qd" "$round" "$tool" "${out// /$'\t'}" \
            >>"$results"
        done
      done
    done
  done
  [[ "$KEEP_FILES" == 1 ]] || rm -f "$file"
done

[[ -s "$results" ]] || die "no location could be measured"
busy_after="$(cpu_busy)"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

table="$(python3 - "$results" <<'PY'
import statistics, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
cells, order = defaultdict(lambda: defaultdict(dict)), []
for loc, rw, qd, rnd, tool, iops, p99 in rows:
    key = (loc, rw, int(qd))
    if key not in cells:
        order.append(key)
    cells[key][int(rnd)][tool] = (float(iops), float(p99))
device = any("device" in t for c in cells.values() for t in c.values())
rounds = max(len(c) for c in cells.values())
med = statistics.median
head = ["location", "workload", "QD", "fio IOPS", "cairn IOPS", "ratio"]
if rounds > 1:
    head.append("ratio range")
head += ["fio p99 µs", "cairn p99 µs"]
if device:
    head += ["device IOPS", "device ratio"]
print("| " + " | ".join(head) + " |")
print("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
goal = []
for key in order:
    rs = cells[key].values()
    get = lambda tool, i: [r[tool][i] for r in rs if tool in r]
    ratios = [r["cairn"][0] / r["fio"][0] for r in rs if r["fio"][0] > 0]
    ratio = med(ratios)
    line = [key[0], key[1], str(key[2]), f"{med(get('fio', 0)):.0f}",
            f"{med(get('cairn', 0)):.0f}", f"{ratio:.2f}"]
    if rounds > 1:
        line.append(f"{min(ratios):.2f}–{max(ratios):.2f}")
    line += [f"{med(get('fio', 1)):.0f}", f"{med(get('cairn', 1)):.0f}"]
    if device:
        d = [r["device"][0] / r["fio"][0] for r in rs if "device" in r]
        line += [f"{med(get('device', 0)):.0f}", f"{med(d):.2f}"]
    print("| " + " | ".join(line) + " |")
    if key[2] >= 32:
        goal.append(f"{key[0]} {key[1]} QD{key[2]}: {ratio:.2f}x "
                    + ("(met)" if ratio >= 0.9 else "(NOT met)"))
print()
print("Goal, cairn >= 0.9x fio at QD32: " + "; ".join(goal))
PY
)"

mkdir -p "$(dirname "$OUT")"
{
  echo "# BlockStore slice path vs fio, $stamp"
  echo
  echo "Command: \`$command_line\`"
  echo
  echo "| machine | |"
  echo "|---|---|"
  echo "| nproc | $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')) |"
  echo "| kernel | $(uname -r) |"
  echo "| memory | $(free -h | awk '/^Mem:/ {print $2}') |"
  echo "| fio | $(fio --version) |"
  echo "| rustc | $(rustc --version) |"
  echo "| cairn | $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo ' + uncommitted changes') |"
  for dir in $DIRS; do
    echo "| $dir | $(df --output=source,fstype "$dir" | tail -1 | tr -s ' ') |"
  done
  echo "| machine CPU busy (2 s sample) | before $busy_before, after $busy_after; load average before $load_before, after $load_after |"
  echo
  echo "Each cell: ${RUNTIME} s per tool, $ROUNDS round(s), 4 KiB I/O over a $SIZE file laid out"
  echo "by a sequential fio write. fio: \`fio --bs=4k --rw=RW --ioengine=io_uring --direct=1"
  echo "--iodepth=QD --size=$fio_size --runtime=$RUNTIME --time_based --norandommap --randrepeat=0"
  echo "--lat_percentiles=1 --filename=FILE\`. cairn: \`cairn bench blockstore --path FILE --rw RW"
  echo "--qd QD --runtime $RUNTIME --size $SIZE\` (formats FILE with 4 KiB slices, reads prefill"
  echo "every slice untimed). Latencies are fio's \`lat\` (submission to completion) and cairn's"
  echo "call-to-return time."
  echo
  echo "$table"
  for n in "${notes[@]}"; do echo; echo "Note: $n"; done
  echo
  echo "<details><summary>Per-round results (location, workload, QD, round, tool, IOPS, p99 µs)</summary>"
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
