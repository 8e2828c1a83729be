#!/usr/bin/env bash
# Records a page-level trace of gcc's cc1 compiling a C file, under valgrind's
# lackey tool, and converts it (`shadow-mmu trace convert`) to the compact
# trace format of crates/testkit/src/trace.rs.
#
#   scripts/record-trace.sh [SRC.c] [OUT.smtrace] [OPT] [WINDOW]
#
# Defaults: traces/src/hashsort.c, traces/cc1-O2.smtrace, -O2, a window of 64
# pages. Runs from the repository root (it cds there), so that the relative
# source path, which cc1 keeps on its stack, is the same on every machine.
# Needs valgrind, gcc and cargo.
#
# lackey writes its trace (one line per instruction fetch, load, store or
# modify: several GB of text for a compile) to valgrind's log, here fd 3,
# which is piped into the converter; nothing large is written to disk. cc1's
# assembly goes to /dev/null, its stderr to a temporary file shown on failure.
#
# Deterministic for a given cc1, glibc, loader, valgrind and CPU: valgrind
# does not randomise the address space, and `env -i` keeps the environment
# (at the top of the stack) empty. Two recordings gave identical files.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
src=${1:-traces/src/hashsort.c}
out=${2:-traces/cc1-O2.smtrace}
opt=${3:--O2}
window=${4:-64}

cc1=$(gcc -print-prog-name=cc1)
multiarch=$(gcc -print-multiarch)
cargo build --release --quiet --bin shadow-mmu
converter=(target/release/shadow-mmu trace convert --window "$window" "$out")

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The cc1 command line is what `gcc $opt -S -o /dev/null SRC -###` runs,
# trimmed to what matters: the include path (-imultiarch), the optimisation
# level, and the output.
cmd=(env -i "$(command -v valgrind)" --tool=lackey --trace-mem=yes --log-fd=3
    "$cc1" -quiet -imultiarch "$multiarch" "$opt" "$src" -o /dev/null)
echo "recording: ${cmd[*]} 3>&1 1>/dev/null 2>$log | ${converter[*]}" >&2
start=$(date +%s)
# pipefail: a failing cc1 (valgrind returns its exit code) or converter
# fails the script.
if ! "${cmd[@]}" 3>&1 1>/dev/null 2>"$log" | "${converter[@]}"; then
    echo "record-trace: failed; cc1's stderr:" >&2
    cat "$log" >&2
    exit 1
fi
echo "recorded in $(($(date +%s) - start)) s" >&2
ls -l "$out" >&2
sha256sum "$out"
