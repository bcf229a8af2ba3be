//! QUIC (`quinn` 0.11, rustls with ring) in the suite, as quinn is meant to
//! be used: async, one tokio current-thread runtime per side (pinned like
//! the others), a self-signed certificate made in-process with rcgen.
//! Reliable-ordered messages ride one long-lived stream; updates are QUIC
//! datagrams (unreliable).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use quinn::{
    ClientConfig, Connection, Endpoint, EndpointConfig, ServerConfig, TransportConfig, VarInt,
};

use super::{
    join, latency_histogram, loopback, set_socket_buffers, FanoutControl, PingRun, Schedule,
    StreamControl, BUCKETS, FANOUT_RUNNING, INPUT_BYTES, OUTSTANDING_MAX, PACED_RATE, PHASE_PACED,
    PHASE_SATURATE, PING_BYTES, STREAM_BYTES, UPDATE_BYTES, WAVE_SIZE,
};

pub(crate) const DESCRIPTION: &str = "quinn 0.11 (QUIC, rustls + ring, TLS 1.3 with an in-process rcgen certificate), tokio current-thread runtime per side; every endpoint on a std UdpSocket given the same 4 MiB SO_RCVBUF/SO_SNDBUF as every other system before quinn wraps it (Endpoint::new); ping: one bidirectional stream, default transport; reliable-100B: one unidirectional stream written in bursts of up to 256 messages, stream receive window from the sweep (4, 16 or 64 MiB; connection receive window and send window twice that; its docs: at least bandwidth x RTT), BBR congestion control (quinn's loss-tolerant option; Cubic, the default, collapses under random loss); clients=N: one stream per client for its messages, QUIC datagrams for the updates, default transport, one client Endpoint for all connections (at most 128 handshakes in progress)";

struct Identity {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

/// One self-signed certificate for the whole run.
fn identity() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
        Identity {
            cert: certified.cert.der().clone(),
            key: certified.signing_key.serialize_der(),
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tuning {
    Default,
    /// The stream, with this stream receive window in MiB.
    Bulk {
        window_mib: u32,
    },
}

/// The stream's window when none is given (the sweep's middle setting).
const WINDOW_MIB_DEFAULT: u32 = 16;

fn bulk(window_mib: Option<u32>) -> Tuning {
    Tuning::Bulk {
        window_mib: window_mib.unwrap_or(WINDOW_MIB_DEFAULT).clamp(1, 512),
    }
}

fn transport(tuning: Tuning) -> Arc<TransportConfig> {
    let mut transport = TransportConfig::default();
    if let Tuning::Bulk { window_mib } = tuning {
        let stream = window_mib << 20;
        transport
            .stream_receive_window(VarInt::from_u32(stream))
            .receive_window(VarInt::from_u32(2 * stream))
            .send_window(2 * stream as u64)
            .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    Arc::new(transport)
}

/// A std socket with the buffers every system gets, handed to quinn.
fn endpoint(server: Option<ServerConfig>) -> Result<Endpoint, String> {
    let socket = std::net::UdpSocket::bind(loopback()).map_err(|e| err("bind")(&e))?;
    set_socket_buffers(&socket).map_err(|e| err("socket buffers")(&e))?;
    let runtime = quinn::default_runtime().ok_or("quinn: no async runtime")?;
    Endpoint::new(EndpointConfig::default(), server, socket, runtime)
        .map_err(|e| err("endpoint")(&e))
}

fn server_endpoint(tuning: Tuning) -> Result<Endpoint, String> {
    endpoint(Some(server_config(tuning).map_err(|e| err("config")(&e))?))
}

fn client_endpoint(tuning: Tuning) -> Result<Endpoint, String> {
    let mut endpoint = endpoint(None)?;
    endpoint.set_default_client_config(client_config(tuning).map_err(|e| err("config")(&e))?);
    Ok(endpoint)
}

fn server_config(tuning: Tuning) -> io::Result<ServerConfig> {
    let identity = identity();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.clone()));
    let mut config = ServerConfig::with_single_cert(vec![identity.cert.clone()], key)
        .map_err(io::Error::other)?;
    config.transport_config(transport(tuning));
    Ok(config)
}

fn client_config(tuning: Tuning) -> io::Result<ClientConfig> {
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots
        .add(identity().cert.clone())
        .map_err(io::Error::other)?;
    let mut config =
        ClientConfig::with_root_certificates(Arc::new(roots)).map_err(io::Error::other)?;
    config.transport_config(transport(tuning));
    Ok(config)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn err(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> String {
    move |e| format!("quinn {what}: {e}")
}

/// Completes once `running` turns false (checked every 5 ms).
async fn stopped(running: impl Fn() -> bool) {
    while running() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `work` until it finishes or `running` turns false.
async fn until_stopped<F: Future<Output = Result<(), String>>>(
    work: F,
    running: impl Fn() -> bool,
) -> Result<(), String> {
    tokio::select! {
        result = work => result,
        _ = stopped(running) => Ok(()),
    }
}

async fn connect(endpoint: &Endpoint, server: SocketAddr) -> Result<Connection, String> {
    endpoint
        .connect(server, "localhost")
        .map_err(|e| err("connect")(&e))?
        .await
        .map_err(|e| err("handshake")(&e))
}

// ---------------------------------------------------------------- ping

pub(crate) fn ping_pong(run: PingRun) -> Result<Histogram<u64>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr_tx, addr_rx) = mpsc::channel();
    let server_stop = stop.clone();
    let server = thread::spawn(move || -> Result<(), String> {
        run.cores.pin_server();
        runtime()?.block_on(async move {
            let endpoint = server_endpoint(Tuning::Default)?;
            let _ = addr_tx.send(endpoint.local_addr().map_err(|e| err("addr")(&e))?);
            let work = async {
                let incoming = endpoint.accept().await.ok_or("quinn endpoint closed")?;
                let connection = incoming.await.map_err(|e| err("accept")(&e))?;
                let (mut send, mut recv) = connection
                    .accept_bi()
                    .await
                    .map_err(|e| err("accept_bi")(&e))?;
                let mut ping = [0u8; PING_BYTES];
                // Ends when the client closes the connection.
                while recv.read_exact(&mut ping).await.is_ok() {
                    if send.write_all(&ping).await.is_err() {
                        break;
                    }
                }
                Ok(())
            };
            let result = until_stopped(work, || !server_stop.load(Ordering::Relaxed)).await;
            endpoint.close(0u32.into(), b"done");
            result
        })
    });
    let server_addr = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "quinn ping server did not start".to_string())?;
    let client = thread::spawn(move || -> Result<Histogram<u64>, String> {
        run.cores.pin_client();
        runtime()?.block_on(async move {
            let endpoint = client_endpoint(Tuning::Default)?;
            let connection = connect(&endpoint, server_addr).await?;
            let (mut send, mut recv) =
                connection.open_bi().await.map_err(|e| err("open_bi")(&e))?;
            let mut histogram = latency_histogram();
            let mut ping = [0u8; PING_BYTES];
            let mut pong = [0u8; PING_BYTES];
            for seq in 0..(run.warmup + run.pings) as u64 {
                ping[..8].copy_from_slice(&seq.to_le_bytes());
                let sent = Instant::now();
                send.write_all(&ping).await.map_err(|e| err("write")(&e))?;
                tokio::time::timeout(Duration::from_secs(2), recv.read_exact(&mut pong))
                    .await
                    .map_err(|_| format!("no answer to ping {seq} within 2 s"))?
                    .map_err(|e| err("read")(&e))?;
                if pong[..8] != ping[..8] {
                    return Err("quinn: wrong ping answered".into());
                }
                if seq as usize >= run.warmup {
                    let _ = histogram.record((sent.elapsed().as_nanos() as u64).max(1));
                }
            }
            connection.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            Ok(histogram)
        })
    });
    let result = join(client, "quinn ping client");
    stop.store(true, Ordering::Relaxed);
    join(server, "quinn ping server")?;
    result
}

// ---------------------------------------------------------------- stream

/// `window_mib`: the stream receive window from the sweep.
pub(crate) fn stream_receiver(
    addr_tx: mpsc::Sender<SocketAddr>,
    control: &StreamControl,
    window_mib: Option<u32>,
) -> Result<(), String> {
    runtime()?.block_on(async {
        let endpoint = server_endpoint(bulk(window_mib))?;
        let _ = addr_tx.send(endpoint.local_addr().map_err(|e| err("addr")(&e))?);
        let mut histogram = latency_histogram();
        let mut expected = 0u64;
        let mut delivered = 0u64;
        let work = async {
            let incoming = endpoint.accept().await.ok_or("quinn endpoint closed")?;
            let connection = incoming.await.map_err(|e| err("accept")(&e))?;
            let mut recv = connection
                .accept_uni()
                .await
                .map_err(|e| err("accept_uni")(&e))?;
            let mut buffer = vec![0u8; 64 * 1024];
            let mut carry: Vec<u8> = Vec::with_capacity(128 * 1024);
            // `read` is cancel-safe: stopping mid-read loses nothing counted.
            while let Some(n) = recv.read(&mut buffer).await.map_err(|e| err("read")(&e))? {
                carry.extend_from_slice(&buffer[..n]);
                let whole = carry.len() / STREAM_BYTES * STREAM_BYTES;
                for message in carry[..whole].chunks(STREAM_BYTES) {
                    delivered += 1;
                    control.on_delivered(message, &mut expected, &mut histogram);
                }
                carry.drain(..whole);
                control.delivered.store(delivered, Ordering::Release);
            }
            Ok(())
        };
        let result = until_stopped(work, || control.running()).await;
        endpoint.close(0u32.into(), b"done");
        let _ = control
            .latency
            .lock()
            .expect("latency lock")
            .add(&histogram);
        result
    })
}

pub(crate) fn stream_sender(
    server: SocketAddr,
    control: &StreamControl,
    window_mib: Option<u32>,
) -> Result<(), String> {
    runtime()?.block_on(async {
        let endpoint = client_endpoint(bulk(window_mib))?;
        let connection = connect(&endpoint, server).await?;
        let mut send = connection
            .open_uni()
            .await
            .map_err(|e| err("open_uni")(&e))?;
        control.connected.store(true, Ordering::Release);
        let work = async {
            let mut burst = vec![0u8; super::SEND_BURST * STREAM_BYTES];
            let mut seq = 0u64;
            let interval = Duration::from_nanos(1_000_000_000 / PACED_RATE);
            let mut next_paced: Option<tokio::time::Instant> = None;
            loop {
                match control.phase.load(Ordering::Acquire) {
                    PHASE_SATURATE => {
                        let delivered = control.delivered.load(Ordering::Acquire);
                        let room = OUTSTANDING_MAX.saturating_sub(seq - delivered) as usize;
                        let count = room.min(super::SEND_BURST);
                        if count == 0 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                        for (i, message) in burst.chunks_mut(STREAM_BYTES).take(count).enumerate() {
                            control.fill(message, seq + i as u64, false);
                        }
                        send.write_all(&burst[..count * STREAM_BYTES])
                            .await
                            .map_err(|e| err("write")(&e))?;
                        seq += count as u64;
                        control.sent.store(seq, Ordering::Release);
                        // Let the connection driver run between bursts.
                        tokio::task::yield_now().await;
                    }
                    PHASE_PACED => {
                        let next = *next_paced.get_or_insert_with(tokio::time::Instant::now);
                        tokio::time::sleep_until(next).await;
                        let message = &mut burst[..STREAM_BYTES];
                        control.fill(message, seq, true);
                        send.write_all(message)
                            .await
                            .map_err(|e| err("write")(&e))?;
                        seq += 1;
                        control.sent.store(seq, Ordering::Release);
                        next_paced = Some(next + interval);
                    }
                    _ => {
                        next_paced = None;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        };
        let result = until_stopped(work, || control.running()).await;
        connection.close(0u32.into(), b"done");
        result
    })
}

// ---------------------------------------------------------------- clients=N

/// The server's view of its connections.
struct ServerState {
    connections: Vec<Connection>,
    schedule: Schedule<usize>,
    received: u64,
}

pub(crate) fn fanout_server(
    addr_tx: mpsc::Sender<SocketAddr>,
    control: &FanoutControl,
) -> Result<(), String> {
    let runtime = runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let endpoint = server_endpoint(Tuning::Default)?;
        let _ = addr_tx.send(endpoint.local_addr().map_err(|e| err("addr")(&e))?);
        let state = Rc::new(RefCell::new(ServerState {
            connections: Vec::with_capacity(control.clients),
            schedule: Schedule::new(Instant::now()),
            received: 0,
        }));
        let accepting = {
            let endpoint = endpoint.clone();
            let state = state.clone();
            tokio::task::spawn_local(async move {
                while let Some(incoming) = endpoint.accept().await {
                    let state = state.clone();
                    tokio::task::spawn_local(async move {
                        let Ok(connection) = incoming.await else {
                            return;
                        };
                        {
                            let mut s = state.borrow_mut();
                            let key = s.connections.len();
                            s.connections.push(connection.clone());
                            s.schedule.add(key);
                        }
                        let Ok(mut recv) = connection.accept_uni().await else {
                            return;
                        };
                        let mut buffer = [0u8; 4096];
                        let mut carry = 0usize;
                        while let Ok(Some(n)) = recv.read(&mut buffer).await {
                            carry += n;
                            state.borrow_mut().received += (carry / INPUT_BYTES) as u64;
                            carry %= INPUT_BYTES;
                        }
                    });
                }
            })
        };
        let update = Bytes::from(vec![0x5Au8; UPDATE_BYTES]);
        while control.running() {
            let due = state.borrow().schedule.due();
            tokio::time::sleep_until(due.into()).await;
            let now = Instant::now();
            let running = control.phase.load(Ordering::Acquire) == FANOUT_RUNNING;
            let mut s = state.borrow_mut();
            let ServerState {
                connections,
                schedule,
                received,
            } = &mut *s;
            schedule.run_due(now, |key| {
                if running {
                    // A full datagram buffer drops its oldest: newest wins.
                    let _ = connections[key].send_datagram(update.clone());
                }
            });
            control
                .server_connected
                .store(connections.len(), Ordering::Release);
            control.server_received.store(*received, Ordering::Release);
        }
        accepting.abort();
        endpoint.close(0u32.into(), b"done");
        Ok(())
    })
}

/// TLS handshakes in progress at most: a QUIC server offered thousands at
/// once spends its time on retransmitted Initials instead of finishing any.
const HANDSHAKES_PENDING_MAX: usize = 128;

pub(crate) fn fanout_clients(server: SocketAddr, control: &FanoutControl) -> Result<(), String> {
    let runtime = runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let endpoint = client_endpoint(Tuning::Default)?;
        let updates = Rc::new(Cell::new(0u64));
        let connected = Rc::new(Cell::new(0usize));
        let failure: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
        let running = Rc::new(tokio::sync::Notify::new());
        let mut started = 0usize;
        let mut next_wave = Instant::now();
        let mut tasks = Vec::with_capacity(control.clients);
        let mut announced = false;
        while control.running() {
            let now = Instant::now();
            let pending = started - connected.get();
            if started < control.clients && now >= next_wave && pending < HANDSHAKES_PENDING_MAX {
                let end = (started + WAVE_SIZE.min(HANDSHAKES_PENDING_MAX - pending))
                    .min(control.clients);
                for client in started..end {
                    let endpoint = endpoint.clone();
                    let (updates, connected, failure, running) = (
                        updates.clone(),
                        connected.clone(),
                        failure.clone(),
                        running.clone(),
                    );
                    tasks.push(tokio::task::spawn_local(async move {
                        let connection = match connect(&endpoint, server).await {
                            Ok(c) => c,
                            Err(e) => {
                                failure.borrow_mut().get_or_insert(e);
                                return;
                            }
                        };
                        connected.set(connected.get() + 1);
                        let reader = {
                            let connection = connection.clone();
                            tokio::task::spawn_local(async move {
                                while connection.read_datagram().await.is_ok() {
                                    updates.set(updates.get() + 1);
                                }
                            })
                        };
                        running.notified().await;
                        let Ok(mut send) = connection.open_uni().await else {
                            return;
                        };
                        // Stagger like the other systems: bucket = index % 50.
                        let phase = Duration::from_millis((client % BUCKETS) as u64);
                        tokio::time::sleep(phase).await;
                        let mut ticks =
                            tokio::time::interval(Duration::from_millis(BUCKETS as u64));
                        let mut message = [0u8; INPUT_BYTES];
                        message[..4].copy_from_slice(&(client as u32).to_le_bytes());
                        loop {
                            ticks.tick().await;
                            if send.write_all(&message).await.is_err() {
                                break;
                            }
                        }
                        reader.abort();
                    }));
                }
                started = end;
                next_wave = now + super::WAVE_INTERVAL;
            }
            if !announced && control.phase.load(Ordering::Acquire) == FANOUT_RUNNING {
                announced = true;
                running.notify_waiters();
            }
            control
                .clients_connected
                .store(connected.get(), Ordering::Release);
            control
                .updates_received
                .store(updates.get(), Ordering::Release);
            if let Some(e) = failure.borrow_mut().take() {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for task in tasks {
            task.abort();
        }
        endpoint.close(0u32.into(), b"done");
        Ok(())
    })
}
