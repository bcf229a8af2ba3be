//! Coordinator leadership through etcd (v3 API, over etcd's HTTP/JSON
//! gateway: no gRPC stack, no `protoc` at build time).
//!
//! Keys under `/tessera/<cluster>/`:
//! - `leader`: the leader's name, attached to its etcd lease. Whoever
//!   creates it leads; it vanishes when the lease is not kept alive.
//! - `epoch`: the cluster epoch, a fencing token raised by every new leader
//!   before it says anything to a node.
//! - `registry`: the registry's durable copy (the control frame nodes
//!   receive), written before each version is published, only while the
//!   writer's `leader` key is the one it created (an etcd transaction), so
//!   a deposed leader can never overwrite its successor's.
//! - `meta`: the cluster's tick origin and rate, fixed by its first leader.
//!
//! [`Leadership`] runs the campaign and the lease on its own thread; the
//! coordinator loop asks it to write registries and reads
//! [`Leadership::valid_until`]: a leader grants node leases and publishes
//! only while etcd surely still holds its lease (counted from when the
//! keepalive was *sent*, so it always ends before etcd's own count).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How a coordinator reaches etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379` (tried in order).
    pub endpoints: Vec<String>,
    /// The cluster's name (its keys' prefix): several clusters may share
    /// one etcd.
    pub cluster: String,
    /// This coordinator's name (shown as the leader).
    pub name: String,
    /// Leader lease TTL asked for, seconds (etcd may raise it to its
    /// minimum: 1.5 election timeouts, rounded up).
    pub ttl_s: u64,
}

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("etcd unreachable at {endpoints}: {last}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last error.
        last: String,
    },
    /// etcd answered with an error.
    #[error("etcd refused {call}: {message}")]
    Refused {
        /// The call.
        call: &'static str,
        /// etcd's message.
        message: String,
    },
    /// The answer was not what the API documents.
    #[error("unexpected etcd answer to {call}: {detail}")]
    Malformed {
        /// The call.
        call: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// A key's value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The value.
    pub value: Vec<u8>,
    /// Revision that created the key.
    pub create_revision: i64,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A blocking client of etcd's v3 JSON gateway.
#[derive(Clone)]
pub struct EtcdClient {
    agent: ureq::Agent,
    endpoints: Vec<String>,
}

fn int(v: &Value, field: &str) -> i64 {
    // The gateway writes int64 as strings and leaves out zero values.
    match v.get(field) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv_of(v: &Value) -> Option<KeyValue> {
    let value = v
        .get("value")
        .and_then(Value::as_str)
        .map_or(Ok(Vec::new()), |s| B64.decode(s))
        .ok()?;
    Some(KeyValue {
        value,
        create_revision: int(v, "create_revision"),
        mod_revision: int(v, "mod_revision"),
        lease: int(v, "lease"),
    })
}

impl EtcdClient {
    /// A client of these endpoints; each call gives up after `timeout`.
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let endpoints = endpoints
            .into_iter()
            .map(|e| e.trim_end_matches('/').to_string())
            .collect();
        Self { agent, endpoints }
    }

    fn call(&self, call: &'static str, path: &str, body: Value) -> Result<Value, EtcdError> {
        let mut last = String::from("no endpoint configured");
        for e in &self.endpoints {
            match self.agent.post(format!("{e}{path}")).send_json(&body) {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let v: Value = match r.body_mut().read_json() {
                        Ok(v) => v,
                        Err(err) => {
                            // Another member may answer properly.
                            last = format!("{e}: {call}: unreadable answer ({status}): {err}");
                            continue;
                        }
                    };
                    if status >= 500 {
                        last = format!("{e}: {call}: {status} {v}");
                        continue;
                    }
                    if status != 200 || v.get("error").is_some() {
                        let message = v
                            .get("error")
                            .or_else(|| v.get("message"))
                            .and_then(Value::as_str)
                            .unwrap_or("(no message)")
                            .to_string();
                        return Err(EtcdError::Refused { call, message });
                    }
                    return Ok(v);
                }
                Err(err) => last = format!("{e}: {err}"),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints.join(","),
            last,
        })
    }

    /// Grants a lease; returns its id and the TTL etcd gave (seconds).
    pub fn grant(&self, ttl_s: u64) -> Result<(i64, i64), EtcdError> {
        let v = self.call(
            "lease grant",
            "/v3/lease/grant",
            json!({ "TTL": ttl_s.to_string() }),
        )?;
        let id = int(&v, "ID");
        if id == 0 {
            return Err(EtcdError::Malformed {
                call: "lease grant",
                detail: v.to_string(),
            });
        }
        Ok((id, int(&v, "TTL")))
    }

    /// Renews a lease; returns its remaining TTL (0: it expired).
    pub fn keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        let v = self.call(
            "lease keepalive",
            "/v3/lease/keepalive",
            json!({ "ID": id.to_string() }),
        )?;
        Ok(v.get("result").map_or(0, |r| int(r, "TTL")))
    }

    /// Revokes a lease (its keys go at once).
    pub fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call(
            "lease revoke",
            "/v3/lease/revoke",
            json!({ "ID": id.to_string() }),
        )
        .map(drop)
    }

    /// Reads a key.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let v = self.call("range", "/v3/kv/range", json!({ "key": B64.encode(key) }))?;
        Ok(v.get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(kv_of))
    }

    /// Writes a key (attached to `lease` if non-zero) if the key `guard`
    /// was created at `created` (0: if `guard` does not exist). Returns the
    /// transaction's revision if it was written.
    pub fn put_if_created(
        &self,
        guard: &str,
        created: i64,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<Option<i64>, EtcdError> {
        let mut put = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if lease != 0 {
            put["lease"] = Value::String(lease.to_string());
        }
        let v = self.call(
            "txn",
            "/v3/kv/txn",
            json!({
                "compare": [{
                    "key": B64.encode(guard), "target": "CREATE", "result": "EQUAL",
                    "create_revision": created.to_string(),
                }],
                "success": [{ "request_put": put }],
            }),
        )?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        Ok(succeeded.then(|| v.get("header").map_or(0, |h| int(h, "revision"))))
    }
}

/// What the cluster's first leader fixed for every later one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterMeta {
    /// Unix time (ms) of tick 0.
    pub tick_origin_ms: u64,
    /// Tick rate.
    pub tick_hz: u32,
}

/// What the leadership thread tells the coordinator loop.
#[derive(Debug)]
pub enum LeaderEvent {
    /// We lead from now on, with this cluster epoch; the registry and meta
    /// the previous leader left (None at the cluster's first start).
    Elected {
        /// The new cluster epoch (the fencing token).
        epoch: u32,
        /// The durable registry frame.
        registry: Option<Vec<u8>>,
        /// Tick origin and rate.
        meta: Option<ClusterMeta>,
    },
    /// Registry `version`, written in the term of cluster epoch `epoch`,
    /// is durable: publish it.
    Written {
        /// The term's epoch.
        epoch: u32,
        /// The version.
        version: u64,
    },
    /// Leadership is gone (the lease expired, or another leader exists):
    /// stop publishing at once.
    Lost {
        /// Why.
        why: String,
    },
}

enum LeaderRequest {
    Write {
        epoch: u32,
        version: u64,
        bytes: Vec<u8>,
    },
    Meta(ClusterMeta),
}

/// The campaign and lease thread of one coordinator.
pub struct Leadership {
    requests: Sender<LeaderRequest>,
    events: Receiver<LeaderEvent>,
    valid_until: Arc<AtomicU64>,
    base: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    ttl: Arc<AtomicU64>,
}

impl Leadership {
    /// Checks etcd answers, then campaigns in the background.
    pub fn start(config: EtcdConfig) -> Result<Self, EtcdError> {
        let client = EtcdClient::new(config.endpoints.clone(), Duration::from_millis(1500));
        // Fail at start, with a clear message, when etcd is not there.
        client.get(&key(&config.cluster, "leader"))?;
        let (req_tx, req_rx) = crossbeam_channel::unbounded();
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        let valid_until = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ttl = Arc::new(AtomicU64::new(config.ttl_s));
        let base = Instant::now();
        let mut campaign = Campaign {
            client,
            config,
            requests: req_rx,
            events: ev_tx,
            valid_until: valid_until.clone(),
            base,
            lease: None,
            leading: None,
            ttl: ttl.clone(),
            pending: None,
        };
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tessera-etcd".into())
            .spawn(move || campaign.run(&s))
            .map_err(|e| EtcdError::Malformed {
                call: "thread",
                detail: e.to_string(),
            })?;
        Ok(Self {
            requests: req_tx,
            events: ev_rx,
            valid_until,
            base,
            stop,
            thread: Some(thread),
            ttl,
        })
    }

    /// Until when this coordinator surely leads (None: it does not).
    pub fn valid_until(&self) -> Option<Instant> {
        match self.valid_until.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    /// The leader lease TTL etcd granted, seconds.
    pub fn ttl_s(&self) -> u64 {
        self.ttl.load(Ordering::Relaxed)
    }

    /// The next event, if any.
    pub fn poll(&self) -> Option<LeaderEvent> {
        self.events.try_recv().ok()
    }

    /// Makes registry `version` of the term of `epoch` durable (answered
    /// by `Written` or `Lost`).
    pub fn write(&self, epoch: u32, version: u64, bytes: Vec<u8>) {
        let _ = self.requests.send(LeaderRequest::Write {
            epoch,
            version,
            bytes,
        });
    }

    /// Records the cluster's tick origin and rate (the first leader).
    pub fn write_meta(&self, meta: ClusterMeta) {
        let _ = self.requests.send(LeaderRequest::Meta(meta));
    }
}

impl Drop for Leadership {
    /// Resigns: the lease is revoked, so a standby leads at once.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn key(cluster: &str, name: &str) -> String {
    format!("/tessera/{cluster}/{name}")
}

struct Campaign {
    client: EtcdClient,
    config: EtcdConfig,
    requests: Receiver<LeaderRequest>,
    events: Sender<LeaderEvent>,
    valid_until: Arc<AtomicU64>,
    base: Instant,
    /// Our etcd lease, its TTL and when it was last renewed.
    lease: Option<(i64, Duration, Instant)>,
    /// The revision that created our `leader` key.
    leading: Option<i64>,
    ttl: Arc<AtomicU64>,
    /// A write that failed on a transient error, tried again first.
    pending: Option<LeaderRequest>,
}

/// How often a standby tries to become leader.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(100);

impl Campaign {
    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            if let Err(e) = self.turn() {
                tracing::warn!(coordinator = %self.config.name, error = %e, "etcd call failed");
                if self.leading.is_some() && self.valid_until().is_none_or(|t| Instant::now() >= t)
                {
                    self.lose(format!("etcd unreachable past the lease: {e}"));
                }
                std::thread::sleep(CAMPAIGN_EVERY);
            }
        }
        if let Some((id, _, _)) = self.lease.take() {
            self.valid_until.store(0, Ordering::Release);
            if let Err(e) = self.client.revoke(id) {
                tracing::warn!(error = %e, "leader lease not revoked: a standby leads once it expires");
            }
        }
    }

    fn valid_until(&self) -> Option<Instant> {
        match self.valid_until.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    fn lose(&mut self, why: String) {
        self.valid_until.store(0, Ordering::Release);
        self.leading = None;
        self.lease = None;
        // Writes asked under the lost term must never land in a later one.
        self.pending = None;
        while self.requests.try_recv().is_ok() {}
        tracing::error!(coordinator = %self.config.name, %why, "leadership lost");
        let _ = self.events.send(LeaderEvent::Lost { why });
    }

    /// Renews the lease when a third of it has run, granting one if needed.
    fn renew(&mut self) -> Result<(), EtcdError> {
        let now = Instant::now();
        match self.lease {
            None => {
                let (id, ttl) = self.client.grant(self.config.ttl_s)?;
                let ttl = Duration::from_secs(ttl.max(1) as u64);
                self.ttl.store(ttl.as_secs(), Ordering::Relaxed);
                self.lease = Some((id, ttl, now));
            }
            Some((id, ttl, renewed)) if now >= renewed + ttl / 3 => {
                let left = self.client.keepalive(id)?;
                if left <= 0 {
                    if self.leading.is_some() {
                        self.lose("the leader lease expired in etcd".into());
                    }
                    self.lease = None;
                    return Ok(());
                }
                self.lease = Some((id, ttl, now));
                if self.leading.is_some() {
                    // Counted from the send: etcd's count starts later.
                    let until = now + ttl;
                    self.valid_until.store(
                        until.duration_since(self.base).as_nanos() as u64,
                        Ordering::Release,
                    );
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn turn(&mut self) -> Result<(), EtcdError> {
        self.renew()?;
        match self.leading {
            None => {
                self.campaign()?;
                if self.leading.is_none() {
                    std::thread::sleep(CAMPAIGN_EVERY);
                }
            }
            Some(created) => {
                let ttl = self.lease.map_or(Duration::from_secs(1), |l| l.1);
                let req = match self.pending.take() {
                    Some(r) => Some(r),
                    None => self.requests.recv_timeout(ttl / 12).ok(),
                };
                if let Some(req) = req {
                    if let Err(e) = self.request(created, &req) {
                        self.pending = Some(req);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn campaign(&mut self) -> Result<(), EtcdError> {
        let Some((lease, ttl, renewed)) = self.lease else {
            return Ok(());
        };
        let leader = key(&self.config.cluster, "leader");
        let created = match self.client.put_if_created(
            &leader,
            0,
            &leader,
            self.config.name.as_bytes(),
            lease,
        ) {
            Ok(Some(created)) => created,
            // The key exists: ours already (an answer lost, or an earlier
            // try that failed half-way) means we go on; else someone leads.
            Ok(None) | Err(_) => match self.client.get(&leader)? {
                Some(kv) if kv.lease == lease => kv.create_revision,
                _ => return Ok(()),
            },
        };
        // Anything written by a deposed leader is older than what follows.
        let epoch_key = key(&self.config.cluster, "epoch");
        let old = self
            .client
            .get(&epoch_key)?
            .and_then(|kv| String::from_utf8(kv.value).ok())
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let registry = self
            .client
            .get(&key(&self.config.cluster, "registry"))?
            .map(|kv| kv.value);
        // The registry carries its own epoch: never go below it.
        let stored = registry
            .as_deref()
            .and_then(|b| tessera_cells::wire::decode_control(b).ok())
            .and_then(|(_, m)| match m {
                tessera_cells::wire::ControlMsg::Registry(r) => Some(r.cluster_epoch()),
                _ => None,
            })
            .unwrap_or(0);
        let epoch = old.max(stored).saturating_add(1);
        if self
            .client
            .put_if_created(
                &leader,
                created,
                &epoch_key,
                epoch.to_string().as_bytes(),
                0,
            )?
            .is_none()
        {
            return Ok(());
        }
        let meta = self
            .client
            .get(&key(&self.config.cluster, "meta"))?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok());
        while self.requests.try_recv().is_ok() {}
        self.leading = Some(created);
        let until = renewed + ttl;
        self.valid_until.store(
            until.duration_since(self.base).as_nanos() as u64,
            Ordering::Release,
        );
        tracing::warn!(coordinator = %self.config.name, cluster = %self.config.cluster, epoch, ttl_s = ttl.as_secs(), "elected leader of the cluster");
        let _ = self.events.send(LeaderEvent::Elected {
            epoch,
            registry,
            meta,
        });
        Ok(())
    }

    fn request(&mut self, created: i64, req: &LeaderRequest) -> Result<(), EtcdError> {
        let leader = key(&self.config.cluster, "leader");
        let (name, bytes, version) = match req {
            LeaderRequest::Write {
                epoch,
                version,
                bytes,
            } => ("registry", bytes.clone(), Some((*epoch, *version))),
            LeaderRequest::Meta(m) => ("meta", serde_json::to_vec(m).unwrap_or_default(), None),
        };
        match self.client.put_if_created(
            &leader,
            created,
            &key(&self.config.cluster, name),
            &bytes,
            0,
        )? {
            Some(_) => {
                if let Some((epoch, version)) = version {
                    let _ = self.events.send(LeaderEvent::Written { epoch, version });
                }
            }
            None => self.lose(format!("another coordinator leads: {name} not written")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_numbers_come_as_strings_numbers_or_not_at_all() {
        let v = json!({ "ID": "7587869112000000001", "TTL": 2, "bad": "x" });
        assert_eq!(int(&v, "ID"), 7_587_869_112_000_000_001);
        assert_eq!(int(&v, "TTL"), 2);
        assert_eq!(int(&v, "bad"), 0);
        assert_eq!(int(&v, "missing"), 0);
    }

    #[test]
    fn a_key_value_decodes_and_bad_base64_is_refused() {
        let kv = json!({ "key": "a2V5", "value": B64.encode("v1"), "create_revision": "5", "mod_revision": "9" });
        assert_eq!(
            kv_of(&kv),
            Some(KeyValue {
                value: b"v1".to_vec(),
                create_revision: 5,
                mod_revision: 9,
                lease: 0,
            })
        );
        assert_eq!(kv_of(&json!({ "value": "%%%" })), None);
        // An empty value is left out by the gateway.
        assert_eq!(
            kv_of(&json!({ "create_revision": "3" })).map(|k| k.value),
            Some(vec![])
        );
    }

    #[test]
    fn an_unreachable_etcd_is_a_clear_error_at_start() {
        let config = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:9".into()],
            cluster: "t".into(),
            name: "a".into(),
            ttl_s: 1,
        };
        let err = Leadership::start(config)
            .err()
            .expect("nothing listens on port 9");
        assert!(matches!(err, EtcdError::Unreachable { .. }), "{err}");
    }
}
