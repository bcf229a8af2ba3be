//! `tessera dev up|down|logs|status`: a whole cluster on one machine, for a
//! person: a coordinator, compute nodes and a gateway, each its own
//! process on its own loopback address, logs under `.dev/logs/`.

use std::fs;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `tessera dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Where the cluster keeps its logs and process ids.
    #[arg(long, default_value = ".dev", env = "TESSERA_DEV_DIR")]
    pub dir: PathBuf,
    #[command(subcommand)]
    pub command: DevCommand,
}

/// Local-cluster commands.
#[derive(clap::Subcommand, Debug)]
pub enum DevCommand {
    /// Start a coordinator, compute nodes and a gateway (clients connect to
    /// the gateway at 127.0.0.1:7777, as to a single node).
    Up {
        /// Compute nodes (127.0.0.2, 127.0.0.3, ...).
        #[arg(long, default_value_t = 2)]
        compute: u16,
        /// Shards per node.
        #[arg(long, default_value_t = 1)]
        shards: u16,
        /// NPCs in the world.
        #[arg(long, default_value_t = 2000)]
        npcs: usize,
        /// World size, COLUMNSxROWS.
        #[arg(long, default_value = "8x8")]
        world: String,
        /// Extra flags for every node (`--no-balance`...), one string.
        #[arg(long, default_value = "")]
        node_flags: String,
    },
    /// Stop every process of the local cluster (SIGTERM, then SIGKILL after
    /// 10 s).
    Down,
    /// Print the last lines of every log; `-f` follows them.
    Logs {
        /// Keep printing new lines (Ctrl-C ends).
        #[arg(short, long)]
        follow: bool,
        /// Lines per log.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
    /// The coordinator's view of the cluster.
    Status,
}

/// The coordinator's addresses in a local cluster.
const COORD: &str = "127.0.0.1:7700";
const COORD_ADMIN: &str = "127.0.0.1:7701";

struct Proc {
    name: String,
    args: Vec<String>,
    ready: &'static str,
}

fn pids_file(dir: &Path) -> PathBuf {
    dir.join("pids")
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn read_pids(dir: &Path) -> Vec<(String, i32)> {
    fs::read_to_string(pids_file(dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (name, pid) = l.split_once(' ')?;
            Some((name.to_string(), pid.trim().parse().ok()?))
        })
        .collect()
}

/// Runs a dev command.
pub fn run(args: DevArgs) -> Result<(), String> {
    match args.command {
        DevCommand::Up {
            compute,
            shards,
            npcs,
            world,
            node_flags,
        } => up(&args.dir, compute, shards, npcs, &world, &node_flags),
        DevCommand::Down => down(&args.dir),
        DevCommand::Logs { follow, lines } => logs(&args.dir, follow, lines),
        DevCommand::Status => crate::admin::run(crate::admin::AdminArgs {
            addr: COORD_ADMIN.parse().expect("literal"),
            json: false,
            token_file: None,
            command: crate::admin::AdminCommand::Status,
        }),
    }
}

fn up(
    dir: &Path,
    compute: u16,
    shards: u16,
    npcs: usize,
    world: &str,
    node_flags: &str,
) -> Result<(), String> {
    if compute == 0 || compute > 200 {
        return Err("--compute must be between 1 and 200".into());
    }
    if read_pids(dir).iter().any(|(_, pid)| alive(*pid)) {
        return Err(format!(
            "a local cluster is already running (pids in {}): tessera dev down first",
            pids_file(dir).display()
        ));
    }
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the tessera binary: {e}"))?;
    let extra: Vec<String> = node_flags.split_whitespace().map(String::from).collect();
    let mut procs = vec![Proc {
        name: "coord".into(),
        args: vec![
            "coord".into(),
            "--listen".into(),
            COORD.into(),
            "--admin-addr".into(),
            COORD_ADMIN.into(),
            "--compute-nodes".into(),
            compute.to_string(),
            "--world".into(),
            world.into(),
        ],
        ready: "coordinator listening",
    }];
    let node = |id: u16, ip: &str, role: &str, port: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "serve",
            "--coord",
            COORD,
            "--node-id",
            &id.to_string(),
            "--cluster-addr",
            &format!("{ip}:7800"),
            "--role",
            role,
            "--bind",
            ip,
            "--port",
            port,
            "--shards",
            &shards.to_string(),
            "--unpinned",
            "--npcs",
            &npcs.to_string(),
            "--world",
            world,
            "--metrics-addr",
            &format!("127.0.0.1:{}", 9110 + 2 * id),
            "--admin-addr",
            &format!("127.0.0.1:{}", 9111 + 2 * id),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().cloned());
        a
    };
    for i in 1..=compute {
        let ip = format!("127.0.0.{}", 1 + i);
        procs.push(Proc {
            name: format!("node-{i}"),
            args: node(i, &ip, "compute", "0"),
            ready: "listening on udp://",
        });
    }
    let gw = compute + 1;
    procs.push(Proc {
        name: format!("gateway-{gw}"),
        args: node(gw, "127.0.0.1", "gateway", "7777"),
        ready: "listening on udp://",
    });

    let mut pids = String::new();
    for p in &procs {
        let log = logs.join(format!("{}.log", p.name));
        let out =
            fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&exe)
            .args(&p.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C in this terminal later does
            // not reach it; `tessera dev down` stops it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", p.name))?;
        pids.push_str(&format!("{} {}\n", p.name, child.id()));
        fs::write(pids_file(dir), &pids).map_err(|e| e.to_string())?;
        if p.name == "coord" {
            wait_ready(&log, p.ready, Duration::from_secs(10), &p.name)?;
        }
    }
    for p in &procs {
        let log = logs.join(format!("{}.log", p.name));
        if let Err(e) = wait_ready(&log, p.ready, Duration::from_secs(60), &p.name) {
            let _ = down(dir);
            return Err(e);
        }
    }
    println!(
        "local cluster up: coordinator, {compute} compute node(s) of {shards} shard(s), 1 gateway"
    );
    println!("  clients:  tessera sim --addr 127.0.0.1:7777   (the gateway)");
    println!("  status:   tessera dev status   (or tessera admin --addr {COORD_ADMIN} status)");
    println!("  move:     tessera admin --addr {COORD_ADMIN} move 0:1,1 2/0");
    println!("  logs:     tessera dev logs [-f]   ({})", logs.display());
    println!("  stop:     tessera dev down");
    Ok(())
}

fn wait_ready(log: &Path, needle: &str, limit: Duration, name: &str) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(line) = text.lines().find(|l| l.starts_with("tessera: ")) {
            return Err(format!("{name} failed: {line} (log: {})", log.display()));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{name} did not start within {limit:?} (log: {})",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn down(dir: &Path) -> Result<(), String> {
    let pids = read_pids(dir);
    if pids.is_empty() {
        println!("no local cluster running (no {})", pids_file(dir).display());
        return Ok(());
    }
    // Nodes first, the coordinator last (nodes tell it they leave). A
    // node's first SIGTERM drains it (its cells move to other nodes); the
    // whole cluster goes, so the second stops it at once.
    for (_, pid) in pids.iter().rev() {
        // SAFETY: signalling a process this tool started.
        unsafe {
            libc::kill(*pid, libc::SIGTERM);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    for (_, pid) in pids.iter().rev() {
        // SAFETY: as above.
        unsafe {
            libc::kill(*pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && pids.iter().any(|(_, p)| alive(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (name, pid) in &pids {
        if alive(*pid) {
            eprintln!("{name} (pid {pid}) did not stop within 10 s: killed");
            // SAFETY: as above.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
    }
    let _ = fs::remove_file(pids_file(dir));
    println!("local cluster stopped ({} processes)", pids.len());
    Ok(())
}

fn logs(dir: &Path, follow: bool, lines: usize) -> Result<(), String> {
    let logs = dir.join("logs");
    let mut files: Vec<PathBuf> = fs::read_dir(&logs)
        .map_err(|e| format!("no logs in {}: {e} (tessera dev up first)", logs.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    let mut offsets = Vec::new();
    for f in &files {
        let name = f
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let text = fs::read_to_string(f).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        println!("==> {name} <==");
        for l in &all[all.len().saturating_sub(lines)..] {
            println!("{l}");
        }
        offsets.push((f.clone(), name, text.len() as u64));
    }
    if !follow {
        return Ok(());
    }
    // Follows until interrupted (Ctrl-C), like `tail -f`.
    loop {
        std::thread::sleep(Duration::from_millis(200));
        for (path, name, offset) in offsets.iter_mut() {
            let Ok(mut file) = fs::File::open(&*path) else {
                continue;
            };
            if file.seek(SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            while reader.read_line(&mut line).map_or(0, |n| n) > 0 {
                if !line.ends_with('\n') {
                    break;
                }
                *offset += line.len() as u64;
                print!("{name}| {line}");
                line.clear();
            }
        }
    }
}
