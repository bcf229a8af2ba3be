//! Authenticated cluster links: every node and coordinator of a cluster
//! shares a [`ClusterKey`]. The side that dials presents a connect token
//! sealed under it (the same mechanism as clients, `tessera_net::token`),
//! the side that listens requires one naming its own address, and the
//! link's packets are sealed with the token's session keys. A process
//! without the key can neither open a link nor inject into one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tessera_net::token::{ConnectToken, SessionKeys, TokenKey, TokenRequest};
use tessera_net::{ConnectionHandle, Endpoint, TokenPolicy};

/// How long a dial's token is valid: links are opened, not kept, under it.
const TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// The key cluster links are sealed under: the current one first, then the
/// previous one (rotation: roll the file out with both lines, then drop
/// the old line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterKey {
    /// Current key first.
    pub keys: Vec<TokenKey>,
}

impl ClusterKey {
    /// Requires every link `endpoint` accepts to present a token under this
    /// key naming one of `addresses` (where the others dial it).
    pub(crate) fn guard(&self, endpoint: &mut Endpoint, addresses: Vec<SocketAddr>) {
        let policy = TokenPolicy {
            keys: self.keys.clone(),
            addresses,
            clock: (Instant::now(), unix_ms()),
        };
        endpoint
            .require_tokens(policy)
            .expect("cluster configurations keep room for the tag");
    }

    /// A fresh token for dialing `to`: a random link identity (the
    /// registration names the node), fresh session keys.
    fn token_for(&self, to: SocketAddr) -> Result<ConnectToken, String> {
        let random = |n: usize| -> Result<Vec<u8>, String> {
            let mut out = Vec::with_capacity(n + 8);
            while out.len() < n {
                let v =
                    tessera_net::driver::os_seed().map_err(|e| format!("no OS randomness: {e}"))?;
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.truncate(n);
            Ok(out)
        };
        let bytes = random(8 + 32 + 32 + 24)?;
        let array = |r: std::ops::Range<usize>| bytes[r].to_vec();
        let client_id = u64::from_le_bytes(array(0..8).try_into().expect("8 bytes")) | 1;
        ConnectToken::mint(
            &self.keys[0],
            &TokenRequest {
                client_id,
                expires_unix_s: unix_ms() / 1000 + TOKEN_LIFETIME.as_secs(),
                servers: &[to],
                user_data: b"tessera-cluster",
            },
            SessionKeys {
                client_to_server: array(8..40).try_into().expect("32 bytes"),
                server_to_client: array(40..72).try_into().expect("32 bytes"),
            },
            array(72..96).try_into().expect("24 bytes"),
        )
        .map_err(|e| e.to_string())
    }
}

/// Dials `to` on `endpoint`: with a key, presenting a fresh token (the
/// link is sealed); without, in clear text.
pub(crate) fn dial(
    endpoint: &mut Endpoint,
    now: Instant,
    to: SocketAddr,
    key: Option<&ClusterKey>,
) -> Result<ConnectionHandle, String> {
    match key {
        Some(k) => {
            let token = k.token_for(to)?;
            endpoint
                .connect_with_token(now, to, &token)
                .map_err(|e| e.to_string())
        }
        None => endpoint.connect(now, to).map_err(|e| e.to_string()),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
