//! Measures the driver's kernel batching on loopback: `recvmmsg`/`sendmmsg`
//! against one syscall per datagram and against glommio's one datagram per
//! io_uring call. Prints the median datagrams/s of a few runs per mode.
//!
//! `cargo run --release -p tessera-net --example socket_batching [-- runs seconds size]`
//!
//! A rough side-by-side for choosing the driver's I/O path, not a benchmark
//! suite (those live in `bench/`). Sender and receiver run on the machine's
//! two cores at once; the table says so.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use tessera_net::driver::{self, BatchSocket, IoMode, SocketConfig};
use tessera_net::TransmitBatch;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Mmsg,
    Single,
    Glommio,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Mmsg => "recvmmsg/sendmmsg (batch 64)",
            Mode::Single => "recvfrom/sendto (1 per syscall)",
            Mode::Glommio => "glommio UdpSocket (1 per io_uring op)",
        }
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn socket(mode: IoMode) -> BatchSocket {
    let config = SocketConfig {
        mode,
        reuse_port: false,
        ..SocketConfig::default()
    };
    BatchSocket::bind(loopback(), &config).expect("bind")
}

/// Sends as fast as it can with sendmmsg until `stop`.
fn blast(to: SocketAddr, size: usize, stop: Arc<AtomicBool>) {
    let mut socket = socket(IoMode::Batched);
    let mut batch = TransmitBatch::new(64);
    let payload = vec![7u8; size];
    for _ in 0..64 {
        batch.push(to, &payload);
    }
    while !stop.load(Ordering::Relaxed) {
        let _ = socket.send_batch(Instant::now(), &batch);
    }
}

/// Datagrams per second received in `mode` while another thread blasts.
fn recv_run(mode: Mode, seconds: f64, size: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let window = Duration::from_secs_f64(seconds);
    let receiver = thread::spawn(move || match mode {
        Mode::Glommio => driver::executor().unwrap().run(async move {
            let socket = glommio::net::UdpSocket::bind(loopback()).unwrap();
            tx.send(socket.local_addr().unwrap()).unwrap();
            let mut buf = vec![0u8; 2048];
            let _ = socket.recv_from(&mut buf).await.unwrap();
            let start = Instant::now();
            let mut count = 0u64;
            while start.elapsed() < window {
                let _ = socket.recv_from(&mut buf).await.unwrap();
                count += 1;
            }
            count as f64 / start.elapsed().as_secs_f64()
        }),
        _ => {
            let mut socket = socket(if mode == Mode::Mmsg {
                IoMode::Batched
            } else {
                IoMode::Single
            });
            tx.send(socket.local_addr()).unwrap();
            while socket.recv_batch().unwrap() == 0 {
                std::hint::spin_loop();
            }
            let start = Instant::now();
            let mut count = 0u64;
            while start.elapsed() < window {
                socket.recv_batch().unwrap();
                count += socket.received().count() as u64;
            }
            count as f64 / start.elapsed().as_secs_f64()
        }
    });
    let to = rx.recv().unwrap();
    let sender_stop = stop.clone();
    let sender = thread::spawn(move || blast(to, size, sender_stop));
    let rate = receiver.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    rate
}

/// Datagrams per second sent in `mode` to a socket nobody reads.
fn send_run(mode: Mode, seconds: f64, size: usize) -> f64 {
    let sink = UdpSocket::bind(loopback()).unwrap();
    let to = sink.local_addr().unwrap();
    let window = Duration::from_secs_f64(seconds);
    let payload = vec![7u8; size];
    match mode {
        Mode::Glommio => driver::executor().unwrap().run(async move {
            let socket = glommio::net::UdpSocket::bind(loopback()).unwrap();
            let start = Instant::now();
            let mut count = 0u64;
            while start.elapsed() < window {
                socket.send_to(&payload, to).await.unwrap();
                count += 1;
            }
            count as f64 / start.elapsed().as_secs_f64()
        }),
        _ => {
            let mut socket = socket(if mode == Mode::Mmsg {
                IoMode::Batched
            } else {
                IoMode::Single
            });
            let mut batch = TransmitBatch::new(64);
            for _ in 0..64 {
                batch.push(to, &payload);
            }
            let start = Instant::now();
            while start.elapsed() < window {
                let _ = socket.send_batch(Instant::now(), &batch);
            }
            socket.stats().send_datagrams as f64 / start.elapsed().as_secs_f64()
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let seconds: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let size: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(300);
    let modes = [Mode::Mmsg, Mode::Single, Mode::Glommio];
    println!(
        "loopback, {size}-byte datagrams, {runs} runs x {seconds} s per mode, modes alternated; \
         {} cpus shared by sender and receiver, unpinned",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (direction, run) in [
        ("receive", recv_run as fn(Mode, f64, usize) -> f64),
        ("send", send_run as fn(Mode, f64, usize) -> f64),
    ] {
        let mut results = vec![Vec::new(); modes.len()];
        for _ in 0..runs {
            for (i, &mode) in modes.iter().enumerate() {
                results[i].push(run(mode, seconds, size));
            }
        }
        let medians: Vec<f64> = results.into_iter().map(median).collect();
        println!(
            "\n{direction:<8} {:<40} {:>14} {:>10}",
            "mode", "datagrams/s", "vs single"
        );
        for (mode, m) in modes.iter().zip(&medians) {
            println!(
                "{direction:<8} {:<40} {:>14.0} {:>9.2}x",
                mode.name(),
                m,
                m / medians[1]
            );
        }
    }
}
