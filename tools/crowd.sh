#!/usr/bin/env bash
# The crowd demonstration: bots gather in cell (1,1) of a 2-shard node, stay
# there --crowd-seconds, then scatter. Run twice, with automatic balancing
# off and on, sampling the worst shard's tick p99 every second.
#
#   tools/crowd.sh [--clients N] [--crowd-seconds S] [--duration S] [--pinned] [--out DIR]
#
# --pinned pins the two shards to CPUs 0 and 1 (default: unpinned, the
# scheduler spreads shards and simulator over the cores).
#
# Writes DIR/{no-balance,balance}/{samples.csv,sim.json,handovers.json,server.log}
# and DIR/summary.txt: tick p99 while crowded (median of the per-second
# worst-shard p99s) without and with balancing, splits, merges and
# handovers, failed sessions and snapshot gaps. Both runs share this
# machine's cores with the simulator: compare them with each other.
set -euo pipefail
cd "$(dirname "$0")/.."

clients=800 crowd=50 duration=90 out=target/crowd pin=--unpinned
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) clients=$2; shift 2 ;;
    --crowd-seconds) crowd=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --pinned) pin=""; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "crowd.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
cargo build --release -p tessera >&2
bin=target/release/tessera

# A 4x4 world of 128 m cells; bots run at 20 m/s so that the crowd gathers
# within seconds; default balancing thresholds.
cat > "$out/node.toml" <<EOF
shards = 2
npcs = 400
[world]
columns = 4
rows = 4
[demo]
player_speed = 20
EOF

free_port() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=="udp" else socket.SOCK_STREAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"; }

run() {
  local name=$1; shift
  local dir="$out/$name"
  mkdir -p "$dir"
  local port mport aport
  port=$(free_port udp); mport=$(free_port tcp); aport=$(free_port tcp)
  "$bin" serve --config "$out/node.toml" $pin --bind 127.0.0.1 --port "$port" \
    --metrics-addr 127.0.0.1:$mport --admin-addr 127.0.0.1:$aport --duration $((duration + 40)) "$@" \
    > "$dir/server.log" 2>&1 &
  local server=$!
  sleep 2
  "$bin" sim --addr 127.0.0.1:$port --clients "$clients" --ramp 10 --duration "$duration" \
    --pattern crowd --crowd-seconds "$crowd" --soak --server-pid $server --metrics-addr 127.0.0.1:$mport \
    --samples "$dir/samples.csv" --out "$dir/sim.json" > "$dir/sim.txt" 2> "$dir/sim.log" || true
  "$bin" admin --addr 127.0.0.1:$aport --json handovers > "$dir/handovers.json" || true
  kill -TERM $server
  wait $server || true
}

run no-balance --no-balance
run balance

python3 - "$out" "$crowd" <<'PY'
import csv, json, sys
out, crowd = sys.argv[1], float(sys.argv[2])
lines = []
for name in ("no-balance", "balance"):
    d = f"{out}/{name}"
    sim = {r["metric"]: r["value"] for r in json.load(open(f"{d}/sim.json"))["results"]}
    rows = list(csv.DictReader(open(f"{d}/samples.csv")))
    def ticks(lo, hi):
        v = sorted(float(r["server_tick_p99_ms"]) for r in rows
                   if r["server_tick_p99_ms"] and lo <= float(r["t_s"]) < hi)
        return v[len(v) // 2] if v else float("nan")
    # The crowd gathers during the first ~20 s after the ramp (10 s).
    crowded = ticks(35, 10 + crowd)
    late = ticks(10 + crowd + 20, 1e9)
    h = json.load(open(f"{d}/handovers.json"))
    lines.append(
        f"{name:10}  tick p99 crowded {crowded:7.1f} ms  after dispersal {late:6.1f} ms  "
        f"splits {h['splits']}  merges {h['merges']}  handovers {h['handovers']}  aborts {h['aborts']}  "
        f"joined {sim['clients_joined']:.0f}  failed {sim['clients_failed']:.0f}  "
        f"gaps>2 {sim['gaps_over_2_ticks']:.0f}  delivered {sim['snapshots_delivered_pct']:.1f}%  "
        f"input->visible p99 {sim['input_to_visible_ms_p99']:.0f} ms")
open(f"{out}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
