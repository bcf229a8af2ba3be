//! `tessera runtime-demo`: starts the shards, ticks, exchanges messages
//! between stages on every shard and prints per-shard statistics.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tessera_runtime::{
    install_stop_on_signals, Envelope, Handled, RuntimeBuilder, ShardContext, ShardHandler,
    ShardId, ShardStats, Stage, StageAddr, StageContext, StageId, StageTable, Tick,
};

/// Options of `tessera runtime-demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Shards to start (default: one per CPU).
    #[arg(long, env = "TESSERA_SHARDS")]
    pub shards: Option<usize>,
    /// Tick rate, 10..=60 Hz.
    #[arg(long, default_value_t = 20, env = "TESSERA_TICK_HZ", value_parser = clap::value_parser!(u32).range(10..=60))]
    pub tick_hz: u32,
    /// Stages per shard.
    #[arg(long, default_value_t = 1000)]
    pub stages: u32,
    /// Pings each shard sends per tick.
    #[arg(long, default_value_t = 20_000)]
    pub pings_per_tick: u32,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Do not pin shards to CPUs.
    #[arg(long)]
    pub unpinned: bool,
}

/// Demo traffic: a ping goes to a random stage anywhere, which answers with
/// a pong to the stage that sent it.
#[derive(Clone, Copy, Debug)]
enum Demo {
    Ping { reply_to: StageAddr },
    Pong,
}

struct Room {
    pongs: Rc<Cell<u64>>,
}

impl Stage<Demo> for Room {
    fn handle(&mut self, cx: &mut StageContext<'_, Demo>, m: Envelope<Demo>) -> Handled {
        match m.msg {
            Demo::Ping { reply_to } => {
                // A full destination drops the pong: the demo counts what arrives.
                let _ = cx.send(reply_to, Demo::Pong);
            }
            Demo::Pong => self.pongs.set(self.pongs.get() + 1),
        }
        Handled::Done
    }
}

struct DemoShard {
    stages: u32,
    pings_per_tick: u32,
    rng: u64,
    pongs: Rc<Cell<u64>>,
}

impl DemoShard {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

impl ShardHandler for DemoShard {
    type Message = Demo;
    type Stage = Room;

    fn on_start(&mut self, _: &mut ShardContext<Demo>, stages: &mut StageTable<Room, Demo>) {
        for _ in 0..self.stages {
            stages.insert(Room {
                pongs: self.pongs.clone(),
            });
        }
    }

    fn on_tick(
        &mut self,
        cx: &mut ShardContext<Demo>,
        _: &mut StageTable<Room, Demo>,
        _tick: Tick,
    ) {
        let shards = cx.shard_count() as u64;
        for _ in 0..self.pings_per_tick {
            let r = self.next();
            let to = StageAddr::new(
                ShardId((r % shards) as u16),
                StageId(((r >> 16) % u64::from(self.stages)) as u32),
            );
            let from = StageAddr::new(
                cx.shard(),
                StageId(((r >> 40) % u64::from(self.stages)) as u32),
            );
            if cx.send(to, Demo::Ping { reply_to: from }).is_err() {
                break;
            }
        }
    }
}

fn print_stats(stats: &[Option<ShardStats>], since: Instant) {
    println!(
        "{:>8} {:>5} {:>8} {:>10} {:>10} {:>10} {:>9} {:>8} {:>12} {:>8}",
        "shard",
        "cpu",
        "ticks",
        "tick_p50",
        "tick_p99",
        "late_p99",
        "overruns",
        "skipped",
        "messages",
        "depth"
    );
    for s in stats.iter().flatten() {
        println!(
            "{:>8} {:>5} {:>8} {:>8}us {:>8}us {:>8}us {:>9} {:>8} {:>12} {:>8}",
            s.shard.to_string(),
            s.cpu.map_or("-".to_string(), |c| c.to_string()),
            s.ticks,
            s.tick_us(0.5),
            s.tick_us(0.99),
            s.lateness_us(0.99),
            s.overruns,
            s.skipped_ticks,
            s.messages_handled,
            s.mailbox_depth
        );
    }
    println!("({:.1} s)", since.elapsed().as_secs_f64());
}

/// Runs the demo until Ctrl-C or `--seconds`.
pub fn run(args: DemoArgs) -> Result<(), String> {
    let stages = args.stages.max(1);
    let pings = args.pings_per_tick;
    let mut builder = RuntimeBuilder::new()
        .pinned(!args.unpinned)
        .tick_hz(args.tick_hz);
    if let Some(n) = args.shards {
        builder = builder.shards(n);
    }
    let runtime = builder
        .start(move |shard| DemoShard {
            stages,
            pings_per_tick: pings,
            rng: 0x2545_F491_4F6C_DD1D ^ (u64::from(shard.0) + 1),
            pongs: Rc::new(Cell::new(0)),
        })
        .map_err(|e| e.to_string())?;
    for (shard, cpu) in runtime.placement() {
        match cpu {
            Some(c) => println!("{shard} -> CPU {c}"),
            None => println!("{shard} -> unpinned"),
        }
    }
    let stop = runtime.stop_handle();
    install_stop_on_signals(stop.clone(), None)
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let started = Instant::now();
    let deadline = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    println!("runtime demo: {stages} stages per shard, {pings} pings per shard per tick at {} Hz; Ctrl-C stops", args.tick_hz);
    loop {
        let wait = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1)),
            None => Duration::from_secs(1),
        };
        if stop.wait_timeout(wait) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        print_stats(&runtime.stats().snapshot(), started);
    }
    runtime.stop();
    let reports = runtime.join().map_err(|e| e.to_string())?;
    println!("final:");
    print_stats(&reports.into_iter().map(Some).collect::<Vec<_>>(), started);
    Ok(())
}
