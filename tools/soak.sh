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
cargo build --profile $profile -p tessera >&2
bin=target/$profile/tessera

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

taskset -c 1 "$bin" sim --addr 127.0.0.1:$port --clients "$clients" --ramp "$ramp" --duration "$hold" \
  --pattern "$pattern" --soak --server-pid $server --metrics-addr 127.0.0.1:$mport \
  --samples "$out/samples.csv" --out "$out/sim.json" 2> "$out/sim.log" | tee "$out/sim.txt"

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
tick_p99 = ticks[int(0.99 * (len(ticks) - 1))] if ticks else float("nan")
rss = max(col("server_rss_mb") or [float("nan")])
cpu = col("server_cpu_pct")
delivered = sim["snapshots_delivered_pct"]
visible = sim["input_to_visible_ms_p99"]
checks = [
    ("snapshots delivered >= 95%", delivered, delivered >= 95),
    ("server tick p99 <= 50 ms (p99 of per-second p99s, hold)", tick_p99, tick_p99 <= 50),
    ("input -> visible p99 <= 150 ms", visible, visible <= 150),
    ("server RSS <= 4096 MB", rss, rss <= 4096),
]
lines = [f"clients joined {sim['clients_joined']:.0f}, failed {sim['clients_failed']:.0f}, gaps > 2 ticks {sim['gaps_over_2_ticks']:.0f}",
         f"server CPU median {sorted(cpu)[len(cpu)//2] if cpu else float('nan'):.0f}% of one core, rtt p99 {sim['rtt_ms_p99']:.1f} ms, bytes/client/s {sim['bytes_per_client_s']:.0f}"]
for name, value, ok in checks:
    lines.append(f"{'PASS' if ok else 'FAIL'} {name}: {value:.1f}")
holds = all(ok for _, _, ok in checks) and sim["clients_failed"] == 0
lines.append("HOLDS" if holds else "DOES NOT HOLD")
open(f"{out}/verdict.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
