#!/usr/bin/env bash
# Soak test on one machine: a node pinned to CPU 0 (one shard) and the load
# simulator pinned to CPU 1, ramping to a target CCU and holding it, sampling
# server CPU, RSS, tick p99 and client-side figures every second.
#
#   tools/soak.sh [--clients N] [--pattern random-walk|crowd|commute] [--ramp S] [--hold S]
#                 [--npcs N] [--world CxR] [--flamegraph] [--out DIR]
#
# Writes DIR/samples.csv, DIR/sim.json, DIR/server.log, DIR/verdict.txt (and
# DIR/flamegraph.svg with --flamegraph). Criteria checked: snapshots delivered
# >= 95%, server tick p99 <= 50 ms, input -> visible p99 <= 150 ms, RSS <= 4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."

clients=2000 pattern=random-walk ramp=30 hold=60 npcs=2000 world=8x8 flame=0 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) clients=$2; shift 2 ;;
    --pattern) pattern=$2; shift 2 ;;
    --ramp) ramp=$2; shift 2 ;;
    --hold) hold=$2; shift 2 ;;
    --npcs) npcs=$2; shift 2 ;;
    --world) world=$2; shift 2 ;;
    --flamegraph) flame=1; shift ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-target/soak/$pattern-$clients}
mkdir -p "$out"
ncpu=$(nproc)
[ "$ncpu" -ge 2 ] || { echo "soak.sh: needs 2 CPUs (server on one, simulator on the other)" >&2; exit 1; }

profile=release
[ $flame = 1 ] && profile=profiling
# TESSERA_BIN=path runs another build (e.g. a saved binary of an earlier
# commit, for before/after comparisons on the same machine).
if [ -n "${TESSERA_BIN:-}" ]; then
  bin=$TESSERA_BIN
else
  cargo build --profile $profile -p tessera >&2
  bin=target/$profile/tessera
fi

port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
aport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

taskset -c 0 "$bin" serve --shards 1 --bind 127.0.0.1 --port "$port" --npcs "$npcs" --world "$world" \
  --metrics-addr 127.0.0.1:$mport --admin-addr 127.0.0.1:$aport --duration $((ramp + hold + 60)) \
  > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 2
kill -0 $server 2>/dev/null || { cat "$out/server.log" >&2; exit 1; }

if [ $flame = 1 ]; then
  # Record the server during the hold, after the ramp.
  ( sleep $((ramp + hold / 3)); tools/flamegraph.sh --pid $server --seconds 10 --out "$out/flamegraph.svg" >&2 ) &
fi

# The tick histogram at the start of the hold; the verdict uses the ticks
# of the hold only (the end snapshot minus this one).
scrape() { python3 -c 'import sys,urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "http://127.0.0.1:$mport/metrics"; }
( sleep $((ramp + 2)); scrape > "$out/metrics-hold-start.txt" 2>/dev/null || true ) &

taskset -c 1 "$bin" sim --addr 127.0.0.1:$port --clients "$clients" --ramp "$ramp" --duration "$hold" \
  --pattern "$pattern" --soak --server-pid $server --metrics-addr 127.0.0.1:$mport \
  --samples "$out/samples.csv" --out "$out/sim.json" 2> "$out/sim.log" | tee "$out/sim.txt"

scrape > "$out/metrics-hold-end.txt" 2>/dev/null || true
kill -TERM $server
wait $server || true
trap - EXIT
wait || true

python3 - "$out" "$ramp" <<'PY'
import csv, json, sys
out, ramp = sys.argv[1], float(sys.argv[2])
sim = {r["metric"]: r["value"] for r in json.load(open(f"{out}/sim.json"))["results"]}
rows = [r for r in csv.DictReader(open(f"{out}/samples.csv")) if float(r["t_s"]) > ramp + 2]
def col(name):
    return [float(r[name]) for r in rows if r[name] not in ("", None)]
ticks = sorted(col("server_tick_p99_ms"))
worst_second = ticks[-1] if ticks else float("nan")
def buckets(path):
    b = {}
    try:
        for line in open(path):
            if line.startswith("tessera_tick_duration_seconds_bucket{"):
                le = float(line.split('le="')[1].split('"')[0])
                b[le] = b.get(le, 0) + float(line.split()[-1])
            elif line.startswith("tessera_tick_duration_seconds_count{"):
                b["count"] = b.get("count", 0) + float(line.split()[-1])
    except OSError:
        pass
    return b
b0, b1 = buckets(f"{out}/metrics-hold-start.txt"), buckets(f"{out}/metrics-hold-end.txt")
hold = {k: b1[k] - b0.get(k, 0) for k in b1}
n = hold.get("count", 0)
# p99 <= 50 ms  <=>  at least 99% of the hold's ticks took <= 50 ms.
within = hold.get(0.05, 0) / n * 100 if n else float("nan")
tick_p99 = next((le * 1000 for le in sorted(k for k in hold if k != "count")
                 if n and hold[le] >= 0.99 * n), float("nan"))
rss = max(col("server_rss_mb") or [float("nan")])
cpu = col("server_cpu_pct")
delivered = sim["snapshots_delivered_pct"]
visible = sim["input_to_visible_ms_p99"]
checks = [
    ("snapshots delivered >= 95%", delivered, delivered >= 95),
    ("server tick p99 <= 50 ms (hold; value = histogram bucket bound holding 99% of ticks)", tick_p99, within >= 99),
    ("input -> visible p99 <= 150 ms", visible, visible <= 150),
    ("server RSS <= 4096 MB", rss, rss <= 4096),
]
lines = [f"clients joined {sim['clients_joined']:.0f}, failed {sim['clients_failed']:.0f}, gaps > 2 ticks {sim['gaps_over_2_ticks']:.0f}",
         f"hold: {n:.0f} ticks, {within:.2f}% within 50 ms; worst per-second tick p99 {worst_second:.1f} ms",
         f"server CPU median {sorted(cpu)[len(cpu)//2] if cpu else float('nan'):.0f}% of one core, rtt p99 {sim['rtt_ms_p99']:.1f} ms, bytes/client/s {sim['bytes_per_client_s']:.0f}"]
for name, value, ok in checks:
    lines.append(f"{'PASS' if ok else 'FAIL'} {name}: {value:.1f}")
holds = all(ok for _, _, ok in checks) and sim["clients_failed"] == 0
lines.append("HOLDS" if holds else "DOES NOT HOLD")
open(f"{out}/verdict.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
