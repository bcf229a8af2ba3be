#!/usr/bin/env bash
# Flamegraph of a running process with perf + inferno.
#   tools/flamegraph.sh --pid PID [--seconds 10] [--out flamegraph.svg]
# Installs linux-perf (Debian) and inferno (cargo) if missing. For readable
# stacks, run a `--profile profiling` build (release + debug symbols).
set -euo pipefail
pid="" seconds=10 out=flamegraph.svg
while [ $# -gt 0 ]; do
  case "$1" in
    --pid) pid=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "flamegraph.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$pid" ] || { echo "flamegraph.sh: --pid is required" >&2; exit 2; }
command -v perf >/dev/null || { apt-get install -y -q linux-perf >/dev/null || { echo "flamegraph.sh: install linux-perf" >&2; exit 1; }; }
command -v inferno-flamegraph >/dev/null || cargo install --quiet inferno >&2
data=$(mktemp /tmp/tessera-perf.XXXXXX)
perf record -F 499 --call-graph dwarf,16384 -p "$pid" -o "$data" -- sleep "$seconds" >/dev/null 2>&1
perf script -i "$data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --title "tessera pid $pid, ${seconds} s" > "$out"
rm -f "$data"
echo "wrote $out"
