//! The suite's driver: which systems run which case, repetitions, the
//! window and capacity sweeps, the validity rules, and the report (rows,
//! ratios, goals, notes).

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::{
    fanout, lossy_link, ping_pong, stream, Args, Cores, FanoutOutcome, FanoutRun, PingRun,
    StreamOutcome, StreamRun, System, BUCKETS, DELIVERY_PCT_MIN, FANOUT_CONNECT_TIMEOUT,
    INPUT_BYTES, LOADGEN_CPU_PCT_MAX, OUTSTANDING_MAX, PACED_RATE, PING_BYTES, RATE_HZ,
    RELAY_DELAY, STREAM_BYTES, UPDATE_BYTES,
};
use crate::report::{median, Report};

/// Runs the suite.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let systems = select_systems(&args)?;
    let windows = parse_windows(&args, &systems)?;
    let cores = Cores::detect();
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let mut report = Report::new("rudp", cores.pinned());
    for system in &systems {
        report.label(system.name(), system.wire());
    }
    report.note(format!(
        "all traffic on 127.0.0.1; {}; the load generator shares this {}-CPU machine with the systems under test; {reps} repetition(s), systems alternated within each, median of the repetitions reported (latency percentiles from each repetition's hdrhistogram)",
        cores.describe(),
        thread::available_parallelism().map_or(1, |n| n.get()),
    ));
    if cfg!(not(feature = "peers")) {
        report.note(
            "peers (rusty_enet, kcp, renet, quinn) are not built: run with `--features peers` to compare against them",
        );
    }
    let mut suite = Suite {
        args,
        cores,
        reps,
        windows,
        report,
        failures: Vec::new(),
        goals: Vec::new(),
    };
    suite.report.note(
        "ratio column: \"X vs S\" compares the row with system S, higher is better for S's side (throughput: S / row; latency, CPU and bytes: row / S); rows of tessera-encrypted and tessera-default are compared with tessera (so > 1 is what encryption or the defaults cost), the encrypted peers with tessera-encrypted too",
    );
    let runs =
        |case: Case| -> Vec<System> { systems.iter().copied().filter(|s| case.runs(*s)).collect() };
    if suite.wants("ping") {
        suite.ping_case(&runs(Case::Ping));
    }
    if suite.wants("stream") {
        suite.stream_case(&runs(Case::Stream));
    }
    if suite.wants("clients") {
        suite.fanout_case(&runs(Case::Clients));
    }
    if suite.wants("capacity") {
        suite.capacity_case(&runs(Case::Clients));
    }
    let Suite {
        mut report,
        failures,
        goals,
        ..
    } = suite;
    describe_systems(&systems, &mut report);
    for (_, failure) in &failures {
        report.note(format!("FAILED: {failure}"));
    }
    for goal in &goals {
        report.note(format!("GOAL: {goal}"));
    }
    report.finish()?;
    // A peer that fails a repetition is reported, not fatal; tessera or the
    // raw ceiling failing is a bug.
    let ours = failures.iter().filter(|(s, _)| s.is_ours()).count();
    if ours == 0 {
        Ok(())
    } else {
        Err(format!("{ours} tessera or raw-udp run(s) failed (see the notes above)").into())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Ping,
    Stream,
    Clients,
}

impl Case {
    fn runs(self, system: System) -> bool {
        match self {
            // The IO-mode variant only matters where one socket carries
            // thousands of connections; the default row would be tessera's
            // (ping has no tuning) but for the peer limit, which would
            // throttle it.
            Case::Ping => !matches!(system, System::TesseraSingle | System::TesseraDefault),
            // raw-udp has no reliability.
            Case::Stream => !matches!(system, System::TesseraSingle | System::RawUdp),
            Case::Clients => true,
        }
    }
}

fn select_systems(args: &Args) -> Result<Vec<System>, String> {
    let all = System::all();
    let Some(names) = &args.systems else {
        return Ok(all);
    };
    names
        .iter()
        .map(|name| {
            all.iter()
                .copied()
                .find(|s| s.name() == name.as_str())
                .ok_or_else(|| {
                    let known: Vec<_> = all.iter().map(|s| s.name()).collect();
                    format!(
                        "unknown or unbuilt system {name:?}; built: {} (peers need --features peers)",
                        known.join(", ")
                    )
                })
        })
        .collect()
}

/// `--windows name=value,...`.
fn parse_windows(args: &Args, systems: &[System]) -> Result<HashMap<System, u32>, String> {
    let mut windows = HashMap::new();
    for item in args.windows.iter().flatten() {
        let parsed = item.split_once('=').and_then(|(name, value)| {
            let system = System::all().into_iter().find(|s| s.name() == name)?;
            Some((system, value.parse::<u32>().ok()?))
        });
        let Some((system, value)) = parsed else {
            return Err(format!(
                "--windows takes system=number items (e.g. kcp=4096), not {item:?}"
            ));
        };
        if systems.contains(&system) && system.window_candidates().0.is_empty() {
            return Err(format!("{} has no stream window to set", system.name()));
        }
        windows.insert(system, value);
    }
    Ok(windows)
}

/// The measured window: `--seconds` or the default.
fn window(args: &Args, default_seconds: f64) -> Duration {
    Duration::from_secs_f64(args.seconds.unwrap_or(default_seconds).max(0.1))
}

/// The repetitions of one system in one case.
struct Reps<T> {
    ok: Vec<T>,
    errors: Vec<String>,
}

impl<T> Reps<T> {
    fn new() -> Self {
        Self {
            ok: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn record(&mut self, result: Result<T, String>) {
        match result {
            Ok(value) => self.ok.push(value),
            Err(e) => self.errors.push(e),
        }
    }

    /// Median of one number over the repetitions.
    fn median(&self, f: impl Fn(&T) -> f64) -> f64 {
        let mut values: Vec<f64> = self.ok.iter().map(f).collect();
        median(&mut values)
    }
}

fn reps_for<T>(systems: &[System]) -> Vec<Reps<T>> {
    systems.iter().map(|_| Reps::new()).collect()
}

/// Errors, each once, with how often it happened.
fn distinct(errors: &[String]) -> String {
    let mut seen: Vec<(&String, usize)> = Vec::new();
    for e in errors {
        match seen.iter_mut().find(|(s, _)| *s == e) {
            Some((_, n)) => *n += 1,
            None => seen.push((e, 1)),
        }
    }
    seen.iter()
        .map(|(e, n)| {
            if *n > 1 {
                format!("{e} (x{n})")
            } else {
                e.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

struct Suite {
    args: Args,
    cores: Cores,
    reps: usize,
    /// Stream settings given with `--windows` (no sweep for those).
    windows: HashMap<System, u32>,
    report: Report,
    failures: Vec<(System, String)>,
    goals: Vec<String>,
}

impl Suite {
    fn wants(&self, case: &str) -> bool {
        self.args
            .cases
            .as_ref()
            .is_none_or(|cases| cases.iter().any(|c| c == case))
    }

    /// True when every repetition succeeded; otherwise the row says "k of
    /// n" and the errors go to the notes (no median of the survivors).
    fn settle<T>(&mut self, case: &str, system: System, reps: &Reps<T>) -> bool {
        if reps.errors.is_empty() {
            return true;
        }
        let ok = reps.ok.len();
        self.report.push(
            case,
            system.name(),
            "repetitions_succeeded",
            ok as f64,
            &format!("of {}", self.reps),
        );
        self.failures.push((
            system,
            format!(
                "{case} {}: {ok} of {} repetitions succeeded: {}",
                system.name(),
                self.reps,
                distinct(&reps.errors)
            ),
        ));
        false
    }

    /// Every other system against `tessera`, and the encrypted peers
    /// against `tessera-encrypted` too; `(metric, higher_is_better)`.
    fn ratios(&mut self, case: &str, systems: &[System], metrics: &[(&str, bool)]) {
        let bases = [System::Tessera, System::TesseraEncrypted];
        for &(metric, higher_is_better) in metrics {
            for &base in &bases {
                for &system in systems {
                    let against_base = match base {
                        System::Tessera => system != System::Tessera,
                        _ => system.flavor().is_none() && system.wire() == "encrypted",
                    };
                    if !against_base {
                        continue;
                    }
                    if higher_is_better {
                        self.report.ratio(case, metric, base.name(), system.name());
                    } else {
                        self.report.ratio(case, metric, system.name(), base.name());
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------ ping

    fn ping_case(&mut self, systems: &[System]) {
        let run = PingRun {
            warmup: if self.args.quick { 200 } else { 1_000 },
            pings: if self.args.quick { 2_000 } else { 5_000 },
            cores: self.cores,
        };
        let case = "ping-32B";
        let mut results: Vec<Reps<Histogram<u64>>> = reps_for(systems);
        for rep in 0..self.reps {
            for (i, &system) in systems.iter().enumerate() {
                eprintln!("rudp: {case}: {} repetition {}", system.name(), rep + 1);
                results[i].record(ping_pong(system, run));
            }
        }
        for (i, &system) in systems.iter().enumerate() {
            if !self.settle(case, system, &results[i]) {
                continue;
            }
            for (metric, quantile) in [("rtt_us_p50", 0.5), ("rtt_us_p99", 0.99)] {
                let value = results[i].median(|h| h.value_at_quantile(quantile) as f64 / 1000.0);
                self.report.push(case, system.name(), metric, value, "us");
            }
        }
        self.ratios(
            case,
            systems,
            &[("rtt_us_p50", false), ("rtt_us_p99", false)],
        );
        self.report.note(format!(
            "{case}: one connection, a {PING_BYTES} B reliable message echoed by the server, one in flight; {} pings after {} warm-up per repetition; one waiting model for every system: each side blocks in the kernel until its socket is readable or its protocol's next timer is due (ppoll, at most 1 ms; quinn: epoll under its tokio current-thread runtime), client and server on separate cores",
            run.pings, run.warmup
        ));
    }

    // ------------------------------------------------------------ stream

    fn stream_case(&mut self, systems: &[System]) {
        let losses = self
            .args
            .loss
            .clone()
            .unwrap_or_else(|| vec![0.0, 5.0, 10.0]);
        let quick = self.args.quick;
        let base = StreamRun {
            loss: 0.0,
            capacity: None,
            seed: 0x7E55_E7A0,
            warmup: Duration::from_millis(if quick { 300 } else { 500 }),
            window: window(&self.args, if quick { 0.7 } else { 1.0 }),
            paced: window(&self.args, if quick { 0.7 } else { 1.0 }),
            setting: None,
            cores: self.cores,
        };
        for &loss in &losses {
            let case = format!("reliable-100B loss={loss}%");
            let run = StreamRun {
                loss: loss / 100.0,
                capacity: (loss > 0.0).then_some(lossy_link(self.args.link_mbit)),
                ..base
            };
            let settings = self.sweep_windows(&case, systems, run);
            let mut results: Vec<Reps<StreamOutcome>> = reps_for(systems);
            for rep in 0..self.reps {
                for (i, &system) in systems.iter().enumerate() {
                    eprintln!("rudp: {case}: {} repetition {}", system.name(), rep + 1);
                    results[i].record(stream(
                        system,
                        StreamRun {
                            // Same link for every system in a repetition.
                            seed: run.seed + rep as u64,
                            setting: settings.get(&system).copied().flatten(),
                            ..run
                        },
                    ));
                }
            }
            for (i, &system) in systems.iter().enumerate() {
                if let Some(Some(setting)) = settings.get(&system) {
                    let unit = window_unit(system);
                    self.report
                        .push(&case, system.name(), "window_chosen", *setting as f64, unit);
                }
                if !self.settle(&case, system, &results[i]) {
                    continue;
                }
                let r = &results[i];
                let mut rows = vec![
                    ("msgs_per_s", r.median(|o| o.msgs_per_s), "msg/s"),
                    (
                        "wire_bytes_per_msg",
                        r.median(|o| o.wire_bytes_per_msg),
                        "B",
                    ),
                ];
                if run.capacity.is_some() {
                    rows.push(("queue_drop_pct", r.median(|o| o.queue_drop_pct), "%"));
                }
                for (metric, quantile) in [("delivery_ms_p50", 0.5), ("delivery_ms_p99", 0.99)] {
                    let value = r.median(|o| o.latency.value_at_quantile(quantile) as f64 / 1e6);
                    rows.push((metric, value, "ms"));
                }
                for (metric, value, unit) in rows {
                    self.report.push(&case, system.name(), metric, value, unit);
                }
            }
            self.ratios(
                &case,
                systems,
                &[
                    ("msgs_per_s", true),
                    ("wire_bytes_per_msg", false),
                    ("delivery_ms_p50", false),
                    ("delivery_ms_p99", false),
                ],
            );
            if loss == 5.0 {
                self.throughput_goal(&case, systems, &results);
            }
        }
        self.stream_notes(&base);
    }

    /// Goal 2: tessera-encrypted's reliable throughput at 5% loss >= 2x
    /// quinn's (both encrypted).
    fn throughput_goal(&mut self, case: &str, systems: &[System], results: &[Reps<StreamOutcome>]) {
        let rate = |system: System| {
            let i = systems.iter().position(|s| *s == system)?;
            let r = &results[i];
            r.errors.is_empty().then(|| r.median(|o| o.msgs_per_s))
        };
        let encrypted = rate(System::TesseraEncrypted);
        #[cfg(feature = "peers")]
        let quinn = rate(System::Quinn);
        #[cfg(not(feature = "peers"))]
        let quinn: Option<f64> = None;
        self.goals.push(match (encrypted, quinn) {
            (Some(e), Some(q)) if q > 0.0 => format!(
                "{case}: reliable throughput tessera-encrypted / quinn = {:.2} ({e:.0} vs {q:.0} msg/s; goal >= 2: {})",
                e / q,
                if e / q >= 2.0 { "met" } else { "NOT met" }
            ),
            _ => format!(
                "{case}: reliable throughput tessera-encrypted / quinn: not measured (one of them did not run or did not succeed every repetition)"
            ),
        });
    }

    /// Picks each system's stream setting for one loss rate: `--windows`,
    /// else the best of one short saturated run per candidate (`--quick`:
    /// the default). tessera-encrypted takes tessera's choice.
    fn sweep_windows(
        &mut self,
        case: &str,
        systems: &[System],
        run: StreamRun,
    ) -> HashMap<System, Option<u32>> {
        let mut chosen: HashMap<System, Option<u32>> = HashMap::new();
        let order = systems
            .iter()
            .copied()
            .filter(|s| *s != System::TesseraEncrypted)
            .chain(
                systems
                    .iter()
                    .copied()
                    .filter(|s| *s == System::TesseraEncrypted),
            );
        for system in order {
            let source = if system == System::TesseraEncrypted {
                System::Tessera
            } else {
                system
            };
            let (candidates, what) = source.window_candidates();
            if candidates.is_empty() {
                chosen.insert(system, None);
                continue;
            }
            if let Some(&fixed) = self.windows.get(&system) {
                chosen.insert(system, Some(fixed));
                self.report.note(format!(
                    "{case}: {} window {fixed} ({what}) set by --windows",
                    system.name()
                ));
                continue;
            }
            if let Some(&Some(setting)) = chosen.get(&source) {
                chosen.insert(system, Some(setting));
                continue;
            }
            if self.args.quick {
                chosen.insert(system, source.window_default());
                continue;
            }
            let mut tried = Vec::new();
            let mut best: Option<(u32, f64)> = None;
            for &candidate in candidates {
                eprintln!("rudp: {case}: {} window sweep, {candidate}", system.name());
                let outcome = stream(
                    system,
                    StreamRun {
                        window: Duration::from_millis(700),
                        paced: Duration::ZERO,
                        setting: Some(candidate),
                        ..run
                    },
                );
                match outcome {
                    Ok(o) => {
                        tried.push(format!("{candidate}: {:.0} msg/s", o.msgs_per_s));
                        if best.is_none_or(|(_, rate)| o.msgs_per_s > rate) {
                            best = Some((candidate, o.msgs_per_s));
                        }
                    }
                    Err(e) => tried.push(format!("{candidate}: failed ({e})")),
                }
            }
            let pick = best.map(|(w, _)| w).or(source.window_default());
            chosen.insert(system, pick);
            self.report.note(format!(
                "{case}: {} window sweep ({what}; one {} ms saturated run each): {}; chosen {}",
                system.name(),
                700,
                tried.join(", "),
                pick.map_or("none".into(), |w| w.to_string())
            ));
        }
        chosen
    }

    fn stream_notes(&mut self, base: &StreamRun) {
        let capacity = lossy_link(self.args.link_mbit);
        self.report.note(format!(
            "reliable-100B: one reliable-ordered stream of {STREAM_BYTES} B messages client -> server through an impairment relay on loopback (one thread, pinned to the server's core): per direction, loss>0 cases a bottleneck of {} Mbit/s (IPv4+UDP headers count) with a drop-tail queue of {} B ({} ms at that rate), then tessera-net's seeded LinkConditioner (uniform random loss after the queue, so lost datagrams used the link), {} ms one-way delay (RTT {} ms), no reordering; loss=0% has no cap and no queue limit (CPU-bound); the same seeds for every system; msgs_per_s = in-order deliveries/s over {:?} after {:?} with the sender saturating (at most {OUTSTANDING_MAX} messages undelivered, plus each system's own backpressure); wire_bytes_per_msg = bytes both sides put on the wire in that window (datagrams of both directions, payload + 28 B of headers, before loss and queue drops) / messages delivered in it; queue_drop_pct = datagrams the bottleneck dropped / offered; delivery_ms = send call -> in-order delivery at a steady {PACED_RATE} msg/s for {:?}; every delivery is checked for order",
            capacity.bits_per_s / 1_000_000,
            capacity.queue_bytes,
            capacity.queue_bytes * 8 * 1000 / capacity.bits_per_s,
            RELAY_DELAY.as_millis(),
            2 * RELAY_DELAY.as_millis(),
            base.window,
            base.warmup,
            base.paced
        ));
        self.report.note(if self.args.quick {
            "reliable-100B: --quick skips the window sweep: tessera 32768, kcp 4096, quinn 16 MiB, rusty_enet throttle preset 0 (ENet's defaults)".to_string()
        } else {
            "reliable-100B: window_chosen is the setting the sweep picked for the row (units per system: see the sweep notes); renet has no window to sweep (its reliable channel is bounded by max_memory_usage_bytes, 16 MiB here, and available_bytes_per_tick, 1 MB per update called every loop turn: neither binds before the 65,536-message bound)".to_string()
        });
        self.report
            .note("reliable-100B: raw-udp is not run (no reliability)");
        #[cfg(feature = "peers")]
        self.report.note(
            "reliable-100B: rusty_enet's reliable window cannot be raised: ENet keeps at most 64 KiB of reliable data in flight per peer (ENET_PROTOCOL_MAXIMUM_WINDOW_SIZE, reached without bandwidth limits), about 580 messages of 100 B with their command headers, so at most ~58,000 msg/s at this 10 ms RTT; its throttle can only shrink that window, which is what the throttle presets sweep",
        );
    }

    // ------------------------------------------------------------ clients=N

    fn fanout_base(&self) -> FanoutRun {
        FanoutRun {
            clients: 0,
            warmup: Duration::from_millis(500),
            window: window(&self.args, if self.args.quick { 1.0 } else { 1.5 }),
            connect_timeout: FANOUT_CONNECT_TIMEOUT,
            cores: self.cores,
        }
    }

    fn sizes(&self) -> Vec<usize> {
        self.args
            .clients
            .clone()
            .unwrap_or_else(|| vec![1_000, 10_000])
    }

    fn fanout_case(&mut self, systems: &[System]) {
        let base = self.fanout_base();
        for clients in self.sizes() {
            let case = format!("clients={clients}");
            // A system that cannot hold `clients` in one endpoint runs at its cap.
            let count_of = |system: System| {
                system
                    .connections_max()
                    .map_or(clients, |max| clients.min(max))
            };
            let mut results: Vec<Reps<FanoutOutcome>> = reps_for(systems);
            for rep in 0..self.reps {
                for (i, &system) in systems.iter().enumerate() {
                    let n = count_of(system);
                    eprintln!(
                        "rudp: {case}: {} ({n} connections) repetition {}",
                        system.name(),
                        rep + 1
                    );
                    results[i].record(fanout(system, FanoutRun { clients: n, ..base }));
                }
            }
            let mut valid = Vec::new();
            for (i, &system) in systems.iter().enumerate() {
                if self.settle(&case, system, &results[i]) && self.valid(&case, system, &results[i])
                {
                    valid.push((system, i));
                }
            }
            let raw_pps = valid
                .iter()
                .find(|(s, _)| *s == System::RawUdp)
                .map(|&(_, i)| results[i].median(|o| o.messages_in_per_s + o.updates_out_per_s));
            for &(system, i) in &valid {
                // Against raw only at the same connection count.
                let n = count_of(system);
                let raw = raw_pps.filter(|_| n == clients);
                self.fanout_rows(&case, system, n, &results[i], raw);
            }
            for &system in systems {
                if let Some(max) = system.connections_max().filter(|&max| clients > max) {
                    self.report.note(format!(
                        "{case}: {} cannot hold {clients} connections in one server endpoint (at most {max}): run at {max}, so its rows are for {max} connections (no % of raw, no ratio)",
                        system.name()
                    ));
                }
            }
            let comparable: Vec<System> = valid
                .iter()
                .map(|&(s, _)| s)
                .filter(|&s| count_of(s) == clients)
                .collect();
            self.ratios(
                &case,
                &comparable,
                &[
                    ("server_cpu_us_per_connection_per_s", false),
                    ("server_cpu_ns_per_pkt", false),
                    ("server_pps_pct_of_raw", true),
                ],
            );
            self.cpu_goal(&case, &comparable, systems, &results);
        }
        self.fanout_notes(&base);
    }

    /// False (and the row says so) when a repetition measured the load
    /// generator or lost deliveries.
    fn valid(&mut self, case: &str, system: System, reps: &Reps<FanoutOutcome>) -> bool {
        let reasons: Vec<String> = reps
            .ok
            .iter()
            .filter_map(FanoutOutcome::invalid_because)
            .collect();
        if reasons.is_empty() {
            return true;
        }
        let name = system.name();
        let valid = reps.ok.len() - reasons.len();
        let rows = [
            (
                "valid_repetitions",
                valid as f64,
                format!("of {}", self.reps),
            ),
            (
                "loadgen_cpu_pct",
                reps.median(FanoutOutcome::loadgen_cpu_pct),
                "%".into(),
            ),
            (
                "delivery_pct",
                reps.median(FanoutOutcome::delivery_pct),
                "%".into(),
            ),
        ];
        for (metric, value, unit) in rows {
            self.report.push(case, name, metric, value, &unit);
        }
        self.report.note(format!(
            "INVALID: {case} {name}: {valid} of {} repetitions valid ({}): no median, no ratio",
            self.reps,
            distinct(&reasons)
        ));
        false
    }

    fn fanout_rows(
        &mut self,
        case: &str,
        system: System,
        n: usize,
        r: &Reps<FanoutOutcome>,
        // The raw-udp server's packets/s at the same connection count.
        raw_pps: Option<f64>,
    ) {
        let cpu = r.median(|o| o.server_cpu_ns_per_s);
        let pps = r.median(|o| o.messages_in_per_s + o.updates_out_per_s);
        let mut rows = vec![
            (
                "connections_held",
                r.median(|o| o.connections as f64),
                "conns",
            ),
            (
                "server_cpu_us_per_connection_per_s",
                cpu / 1000.0 / n as f64,
                "us/s",
            ),
            (
                "server_cpu_ns_per_pkt",
                if pps > 0.0 { cpu / pps } else { 0.0 },
                "ns",
            ),
            ("server_cpu_pct", cpu / 1e7, "%"),
            (
                "loadgen_cpu_pct",
                r.median(FanoutOutcome::loadgen_cpu_pct),
                "%",
            ),
            ("delivery_pct", r.median(FanoutOutcome::delivery_pct), "%"),
            (
                "server_msgs_in_per_s",
                r.median(|o| o.messages_in_per_s),
                "msg/s",
            ),
            (
                "updates_delivered_per_s",
                r.median(|o| o.updates_out_per_s),
                "msg/s",
            ),
            ("server_pps", pps, "pkt/s"),
        ];
        if let Some(raw) = raw_pps {
            rows.push(("server_pps_pct_of_raw", 100.0 * pps / raw, "%"));
        }
        for (metric, value, unit) in rows {
            self.report.push(case, system.name(), metric, value, unit);
        }
    }

    /// Goal 1: server CPU per packet with encryption <= 1.3x without.
    fn cpu_goal(
        &mut self,
        case: &str,
        comparable: &[System],
        systems: &[System],
        results: &[Reps<FanoutOutcome>],
    ) {
        let per_packet = |system: System| {
            if !comparable.contains(&system) {
                return None;
            }
            let i = systems.iter().position(|s| *s == system)?;
            let r = &results[i];
            let cpu = r.median(|o| o.server_cpu_ns_per_s);
            let pps = r.median(|o| o.messages_in_per_s + o.updates_out_per_s);
            (pps > 0.0).then_some(cpu / pps)
        };
        if !systems.contains(&System::TesseraEncrypted) || !systems.contains(&System::Tessera) {
            return;
        }
        self.goals.push(
            match (per_packet(System::TesseraEncrypted), per_packet(System::Tessera)) {
                (Some(e), Some(c)) => format!(
                    "{case}: server CPU per packet tessera-encrypted / tessera = {:.2} ({e:.0} vs {c:.0} ns; goal <= 1.3: {})",
                    e / c,
                    if e / c <= 1.3 { "met" } else { "NOT met" }
                ),
                _ => format!(
                    "{case}: server CPU per packet tessera-encrypted / tessera: no valid pair of runs"
                ),
            },
        );
    }

    fn fanout_notes(&mut self, base: &FanoutRun) {
        let offered = 2 * RATE_HZ;
        self.report.note(format!(
            "clients=N: N connections to one server endpoint on one socket; every client sends a {INPUT_BYTES} B reliable-ordered message {RATE_HZ} times/s and the server sends every client a {UPDATE_BYTES} B unreliable update {RATE_HZ} times/s, both staggered over {BUCKETS} 1 ms buckets (offered: {offered} packets/s per connection); after {:?} warm-up, {:?} measured; server CPU = the server thread's schedstat run time (user + kernel, including loopback delivery it triggers); server_pps = client messages received by the server + updates received by the clients, per second (application packets; acks and keep-alives are not counted); server_pps_pct_of_raw compares with the raw-udp server under the same load; server_cpu_ns_per_pkt = server CPU / server_pps (efficiency even where the server saturates, which caps CPU per connection at 1e6/N us/s); loadgen_cpu_pct = the load generator's thread, on the other core; delivery_pct = the worse of messages received / offered and updates received / offered",
            base.warmup, base.window
        ));
        self.report.note(format!(
            "clients=N: a repetition is INVALID when its load generator's thread used >= {LOADGEN_CPU_PCT_MAX}% of its core or delivery_pct < {DELIVERY_PCT_MIN}%: it measures the load generator, so the system shows valid_repetitions (k of n) with the medians of loadgen_cpu_pct and delivery_pct, and no other row or ratio"
        ));
        self.report.note(
            "clients=N: server loops wake when the socket is readable or the next 1 ms bucket is due; they receive everything waiting, run timers, send the due updates and flush; the load generator runs the same loop for all clients on the other core",
        );
    }

    // ------------------------------------------------------------ capacity

    /// The largest valid clients=N per system: doubling from the smallest
    /// N, then bisecting, within a time budget per system.
    fn capacity_case(&mut self, systems: &[System]) {
        let case = "clients-capacity";
        let start = self.sizes().into_iter().min().unwrap_or(1_000).max(1);
        let sweep_max = self.args.capacity_max.unwrap_or(65_536).max(start);
        let budget = Duration::from_secs(if self.args.quick { 40 } else { 150 });
        let base = FanoutRun {
            window: window(&self.args, if self.args.quick { 0.5 } else { 1.0 }),
            connect_timeout: Duration::from_secs(20),
            ..self.fanout_base()
        };
        let mut found: Vec<(System, Capacity)> = Vec::new();
        for &system in systems {
            let max = system
                .connections_max()
                .map_or(sweep_max, |m| m.min(sweep_max));
            let capacity = sweep_capacity(system, base, start.min(max), max, budget);
            let name = system.name();
            if let Some(n) = capacity.sustained {
                self.report
                    .push(case, name, "connections_sustained", n as f64, "conns");
            } else {
                self.report
                    .push(case, name, "connections_sustained", 0.0, "conns");
            }
            self.report.note(format!(
                "{case}: {name}: {}; trials: {}",
                capacity.bound.describe(capacity.sustained),
                capacity.trials.join(", ")
            ));
            found.push((system, capacity));
        }
        // A ratio only where both sides were stopped by their server
        // failing to deliver: a load generator or a cap bounds the
        // harness, not the system.
        let server_bound: Vec<System> = found
            .iter()
            .filter(|(_, c)| matches!(c.bound, Bound::Delivery) && c.sustained.is_some())
            .map(|(s, _)| *s)
            .collect();
        if server_bound.contains(&System::Tessera) {
            self.ratios(case, &server_bound, &[("connections_sustained", true)]);
        }
        self.report.note(format!(
            "{case}: per system, clients=N runs (one repetition, {:?} warm-up, {:?} measured, 20 s to connect) from N = {start}, doubling up to {sweep_max} (or the system's endpoint cap) until a run is invalid or fails, then up to 3 bisection steps; at most {:?} per system; connections_sustained = the largest N whose run was valid (load generator < {LOADGEN_CPU_PCT_MAX}% CPU, delivery >= {DELIVERY_PCT_MIN}%, every connection held); ratios only between systems whose limit was their own delivery",
            base.warmup, base.window, budget
        ));
    }
}

/// What stopped a capacity sweep.
enum Bound {
    /// The server did not deliver (the system's own limit).
    Delivery,
    /// The load generator saturated first: the system holds at least this.
    LoadGenerator,
    /// A run failed with an error.
    Failed,
    /// The system's endpoint cannot hold more.
    EndpointCap,
    /// The sweep's largest N was valid.
    SweepMax,
    /// The time budget ran out.
    Budget,
}

impl Bound {
    fn describe(&self, sustained: Option<usize>) -> String {
        let n = sustained.map_or("no N".to_string(), |n| n.to_string());
        match self {
            Bound::Delivery => format!("{n} sustained; the next step did not deliver"),
            Bound::LoadGenerator => format!(
                "{n} sustained; the next step saturated the load generator, so the server's own limit is at least that"
            ),
            Bound::Failed => format!("{n} sustained; the next step failed"),
            Bound::EndpointCap => format!("{n} sustained: the endpoint's cap"),
            Bound::SweepMax => format!("{n} sustained: the sweep's largest N"),
            Bound::Budget => format!("{n} sustained when the time budget ran out"),
        }
    }
}

struct Capacity {
    sustained: Option<usize>,
    bound: Bound,
    trials: Vec<String>,
}

/// One trial: Ok when valid, else what stopped it.
fn capacity_trial(system: System, base: FanoutRun, n: usize) -> (Result<(), Bound>, String) {
    eprintln!("rudp: clients-capacity: {} at {n}", system.name());
    match fanout(system, FanoutRun { clients: n, ..base }) {
        Err(e) => (Err(Bound::Failed), format!("{n} failed ({e})")),
        Ok(o) if o.connections < n => (
            Err(Bound::Delivery),
            format!("{n} invalid ({} connections held)", o.connections),
        ),
        Ok(o) => match o.invalid_because() {
            None => (Ok(()), format!("{n} ok")),
            Some(why) if o.loadgen_cpu_pct() >= LOADGEN_CPU_PCT_MAX => {
                (Err(Bound::LoadGenerator), format!("{n} invalid ({why})"))
            }
            Some(why) => (Err(Bound::Delivery), format!("{n} invalid ({why})")),
        },
    }
}

fn sweep_capacity(
    system: System,
    base: FanoutRun,
    start: usize,
    max: usize,
    budget: Duration,
) -> Capacity {
    let began = Instant::now();
    let mut trials = Vec::new();
    let mut good: Option<usize> = None;
    let mut bad: Option<(usize, Bound)> = None;
    let mut n = start;
    // Doubling (or halving, while even the start is too much).
    loop {
        if began.elapsed() > budget {
            return Capacity {
                sustained: good,
                bound: Bound::Budget,
                trials,
            };
        }
        let (result, trial) = capacity_trial(system, base, n);
        trials.push(trial);
        match result {
            Ok(()) => {
                good = Some(n);
                if bad.is_some() {
                    break;
                }
                if n >= max {
                    let bound = if system.connections_max() == Some(max) {
                        Bound::EndpointCap
                    } else {
                        Bound::SweepMax
                    };
                    return Capacity {
                        sustained: good,
                        bound,
                        trials,
                    };
                }
                n = (n * 2).min(max);
            }
            Err(bound) => {
                bad = Some((n, bound));
                if good.is_some() || n <= start / 8 || n < 2 {
                    break;
                }
                n /= 2;
            }
        }
    }
    let (mut high, mut bound) = bad.expect("a failed trial ended the doubling");
    // Bisection between the largest valid and the smallest invalid N.
    if let Some(mut low) = good {
        for _ in 0..3 {
            if began.elapsed() > budget || high - low <= (start / 8).max(1) {
                break;
            }
            let mid = low + (high - low) / 2;
            let (result, trial) = capacity_trial(system, base, mid);
            trials.push(trial);
            match result {
                Ok(()) => low = mid,
                Err(b) => {
                    high = mid;
                    bound = b;
                }
            }
        }
        good = Some(low);
    }
    Capacity {
        sustained: good,
        bound,
        trials,
    }
}

/// The unit of a system's stream setting.
fn window_unit(system: System) -> &'static str {
    match system {
        System::Tessera | System::TesseraEncrypted => "msgs",
        #[cfg(feature = "peers")]
        System::Kcp => "segments",
        #[cfg(feature = "peers")]
        System::Quinn => "MiB",
        #[cfg(feature = "peers")]
        System::Enet => "preset",
        _ => "",
    }
}

fn describe_systems(systems: &[System], report: &mut Report) {
    report.note(
        "wire: encrypted = every packet after the handshake is sealed with an AEAD (tessera-encrypted: ChaCha20-Poly1305 with token session keys; quinn: QUIC packet protection, TLS 1.3 AES-GCM/ChaCha20 suites of rustls+ring; renet: netcode's ChaCha20-Poly1305, also in its unsecure token mode), so the row pays for sealing and opening; clear = no encryption or authentication of packets",
    );
    for system in systems {
        let text = match system {
            System::Tessera => super::tessera::DESCRIPTION,
            System::TesseraEncrypted => super::tessera::ENCRYPTED_DESCRIPTION,
            System::TesseraDefault => super::tessera::DEFAULT_DESCRIPTION,
            System::TesseraSingle => super::tessera::SINGLE_DESCRIPTION,
            System::RawUdp => super::raw::DESCRIPTION,
            #[cfg(feature = "peers")]
            System::Enet => super::peer_enet::DESCRIPTION,
            #[cfg(feature = "peers")]
            System::Kcp => super::peer_kcp::DESCRIPTION,
            #[cfg(feature = "peers")]
            System::Renet => super::peer_renet::DESCRIPTION,
            #[cfg(feature = "peers")]
            System::Quinn => super::peer_quinn::DESCRIPTION,
        };
        report.note(format!("{}: {text}", system.name()));
    }
}
