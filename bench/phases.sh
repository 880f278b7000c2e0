#!/usr/bin/env bash
# Where one benchmark scenario spends its time, by kernel and by layer:
# `perf record -g` of the scenario's child (`moe bench --child SC`, many
# trials, so set-up is diluted), then each sample's time given to
#   - the kernel it ran in: the innermost named function, skipping the SIMD
#     level's trampoline (`Avx2::run::with_avx2`, …), closures and std;
#   - for samples inside a matrix product, the layer that asked for it
#     (the innermost two of Linear/Expert/Attention forward/backward,
#     forming dW in the optimizer, …).
# A layer inlined into its caller is named by that caller (an inlined
# Expert::forward shows as MoeBlock::forward).
# The kernels are inlined into their level's trampoline, so a plain profile
# names them all `with_avx512`; this reads the call chains instead. Needs
# linux-perf and a binary with frame pointers:
#   RUSTFLAGS="-C force-frame-pointers=yes" cargo build --release --target-dir /tmp/tgt-fp
#   bench/phases.sh /tmp/tgt-fp/release/moe mem_train_step [LEVEL] [TRIALS]
# (LEVEL sets MOE_SIMD; TRIALS defaults to 3000). Runs pinned to core 1.
set -euo pipefail
moe=$(realpath "$1"); scenario=$2; level=${3:-}; trials=${4:-3000}
data=$(mktemp); script=$(mktemp)
trap 'rm -f "$data" "$script"' EXIT
MOE_SIMD=$level taskset -c 1 perf record -q -F 4000 -g -o "$data" -- \
    "$moe" bench --child "$scenario" --trials "$trials" --warmup 3 >/dev/null 2>&1
perf script -i "$data" -F ip,sym > "$script" 2>/dev/null
echo "# bench/phases.sh $* — $(MOE_SIMD=$level "$moe" --version | paste -sd " ")"
python3 - "$script" <<'PY'
import collections, re, sys

PLUMBING = re.compile(r"::run::with_|\{\{closure\}\}|for_each|^core::|^alloc::|^std::|"
                      r"^__mem|^\[unknown\]|by_blocks|matmul_with")
LAYER = re.compile(r"(Linear|Expert|Attention|Embedding|Router|MoeBlock)::(forward|backward)|"
                   r"outer::rows_on|Model::loss_and_backward|Model::run_forward")

def samples(path):
    stack = []
    for line in open(path):
        line = line.strip()
        if not line:
            if stack:
                yield stack
            stack = []
            continue
        parts = line.split(" ", 1)
        if len(parts) == 2:
            stack.append(re.sub(r"\+0x[0-9a-f]+$", "", parts[1].rsplit(" (", 1)[0]))
    if stack:
        yield stack

kernels, products, total = collections.Counter(), collections.Counter(), 0
for stack in samples(sys.argv[1]):
    total += 1
    named = [f for f in stack if not PLUMBING.search(f)]
    kernel = named[0] if named else stack[0]
    kernels[kernel] += 1
    if kernel.endswith(("gemm::gemm", "kernels::matmul_packed")):
        layers = [m.group(0) for f in stack if (m := LAYER.search(f))][:2]
        layer = " in ".join(layers) or "other"
        products[layer.replace("outer::rows_on", "forming dW (AdamW pass)")] += 1

def table(title, counts):
    print(f"\n{title}\n")
    print("| share | where |\n|---|---|")
    for name, n in counts.most_common():
        if 100 * n / total >= 0.3:
            print(f"| {100 * n / total:5.1f} % | `{name}` |")

print(f"\n{total} samples.")
table("Self time by kernel (innermost named function):", kernels)
table("Matrix products by the layer that asked for them:", products)
PY
