#!/usr/bin/env bash
# Where one benchmark scenario spends its time, by 64-byte block of machine
# code: `perf record` of `moe bench --scenario SC --trials 300` (so the child's
# one-off set-up — weight init, packing, page faults — is diluted), then the
# share of the scenario child's samples in each block of the `moe` binary,
# the hottest first. Read a block with
#   objdump -d --no-show-raw-insn --start-address=ADDR --stop-address=ADDR+64 MOE
#
#   bench/hot_blocks.sh MOE SCENARIO [LEVEL]     (LEVEL sets MOE_SIMD)
# Needs linux-perf. Runs the scenario pinned to core 0.
set -euo pipefail
moe=$(realpath "$1"); scenario=$2; level=${3:-}
data=$(mktemp); script=$(mktemp)
MOE_SIMD=$level perf record -q -o "$data" -- taskset -c 0 "$moe" bench --scenario "$scenario" --trials 300 >/dev/null 2>&1
perf script -i "$data" --show-mmap-events -F pid,ip > "$script" 2>/dev/null
python3 - "$moe" "$script" <<'PY'
import collections, re, subprocess, sys
moe, script = sys.argv[1], sys.argv[2]
# The executable segment's file offset and address (to turn run-time addresses into objdump's).
seg = next(l.split() for l in subprocess.run(["readelf", "-lW", moe], capture_output=True, text=True).stdout.splitlines()
           if l.strip().startswith("LOAD") and "R E" in l)
offset, vaddr = int(seg[1], 16), int(seg[2], 16)
maps = {}
for line in open(script):
    m = re.search(r"^\s*(\d+) PERF_RECORD_MMAP2 .*\[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (0x[0-9a-f]+) .*r-xp " + re.escape(moe), line)
    if m:
        maps[m.group(1)] = (int(m.group(2), 16), int(m.group(4), 16))
child = max(maps, key=int)  # the scenario runs in the bench's last child process
base, file_off = maps[child]
counts, total = collections.Counter(), 0
for line in open(script):
    parts = line.split()
    if len(parts) == 2 and parts[0] == child:
        total += 1
        ip = int(parts[1], 16)
        if base <= ip < base + (1 << 32):
            counts[(ip - base + file_off - offset + vaddr) >> 6 << 6] += 1
print(f"{total} samples in the scenario's process (pid {child}); blocks of {moe}:")
for block, n in counts.most_common(15):
    print(f"  {block:#x}  {n:6d}  {100 * n / total:5.1f} %")
PY
rm -f "$data" "$script"
