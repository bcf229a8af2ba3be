//! Connect tokens: who may connect, as a game's login service says.
//!
//! The login service (the seed's JWT issuer) and the servers share a
//! [`TokenKey`]. For each client it mints a [`ConnectToken`]: the client id,
//! an expiry, the server addresses it is valid for, fresh per-session keys,
//! and bounded user data. The part the server needs is sealed with
//! XChaCha20-Poly1305 under the shared key (a random 24-byte nonce, so keys
//! need no nonce bookkeeping); the client cannot read or change it, and
//! carries it in its padded connect request. The client learns its
//! session keys from the token's public part, which travels to it over the
//! login service's own secure channel (HTTPS), never over this protocol.
//!
//! Servers accept tokens sealed under the current key or the previous one,
//! so keys rotate without refusing tokens already handed out.
//!
//! Sealed layout ([`SEALED_TOKEN_LEN`] bytes, little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version (1) |
//! | 1 | 8 | expiry, Unix seconds |
//! | 9 | 24 | nonce |
//! | 33 | 483 | ciphertext of the private part (below) |
//! | 516 | 16 | Poly1305 tag |
//!
//! The version, the protocol id and the expiry are the associated data: the
//! expiry is checked before any decryption, and cannot be changed.
//!
//! Private part: `client_id u64`, `user_data_len u16`, `user_data [256]`,
//! `server_count u8`, 8 x (`family u8` 4 or 6, `ip [16]`, `port u16`),
//! `client_to_server_key [32]`, `server_to_client_key [32]`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};

use crate::wire::PROTOCOL_ID;

/// Token format version.
pub const TOKEN_VERSION: u8 = 1;
/// Largest user data a token carries (account data for the game server).
pub const USER_DATA_MAX: usize = 256;
/// Most server addresses one token is valid for.
pub const SERVERS_MAX: usize = 8;
/// Length of every key: the shared token key and each session key.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const ADDR_LEN: usize = 19;
const PRIVATE_LEN: usize = 8 + 2 + USER_DATA_MAX + 1 + SERVERS_MAX * ADDR_LEN + 2 * KEY_LEN;
/// Length of the sealed part a client presents.
pub const SEALED_TOKEN_LEN: usize = 1 + 8 + NONCE_LEN + PRIVATE_LEN + TAG_LEN;
/// Length of a whole token as [`ConnectToken::to_bytes`] writes it.
pub const TOKEN_LEN: usize =
    1 + 8 + 8 + 1 + SERVERS_MAX * ADDR_LEN + 2 * KEY_LEN + SEALED_TOKEN_LEN;

/// The key shared by the login service and the servers.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey(pub [u8; KEY_LEN]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// Reads a key written as 64 hex digits (whitespace around is ignored).
    pub fn from_hex(text: &str) -> Result<Self, TokenError> {
        let bytes = from_hex(text.trim()).ok_or(TokenError::BadKey)?;
        let key: [u8; KEY_LEN] = bytes.try_into().map_err(|_| TokenError::BadKey)?;
        Ok(Self(key))
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

/// The keys that encrypt one session's packets, one per direction.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Seals what the client sends.
    pub client_to_server: [u8; KEY_LEN],
    /// Seals what the server sends.
    pub server_to_client: [u8; KEY_LEN],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// Why a token, or a key, was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Wrong length or version: not a token of this protocol.
    #[error("malformed token")]
    Malformed,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Not sealed under any key this server holds (forged, damaged, or
    /// sealed under a key older than the previous one).
    #[error("token seal does not open")]
    BadSeal,
    /// Opened, but its content is inconsistent (a bug or a misused key).
    #[error("token content is invalid")]
    BadContent,
    /// Not valid for the address the client reached.
    #[error("token not valid for this server address")]
    WrongAddress,
    /// A mint request out of bounds (too much user data, too many or no
    /// server addresses).
    #[error("token request out of bounds: {0}")]
    OutOfBounds(&'static str),
    /// A key that is not 64 hex digits.
    #[error("a key is 64 hex digits")]
    BadKey,
}

/// What the server learns from a token it opened.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TokenClaims {
    /// The player's identity: a reconnect with another token of this id is
    /// the same player.
    pub client_id: u64,
    /// Expiry, Unix seconds.
    pub expires_unix_s: u64,
    /// The game's account data, opaque here.
    pub user_data: Vec<u8>,
    /// Addresses the token is valid for.
    pub servers: Vec<SocketAddr>,
    /// The session's packet keys.
    pub keys: SessionKeys,
}

/// A token as the login service hands it to a client.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ConnectToken {
    /// The player's identity.
    pub client_id: u64,
    /// Expiry, Unix seconds.
    pub expires_unix_s: u64,
    /// Servers to try, in order.
    pub servers: Vec<SocketAddr>,
    /// The session's packet keys (the client's copy).
    pub keys: SessionKeys,
    /// The sealed part, presented to the server as is.
    pub sealed: Box<[u8; SEALED_TOKEN_LEN]>,
}

/// What a login service asks a token for.
#[derive(Clone, Debug)]
pub struct TokenRequest<'a> {
    /// The player's identity (not 0).
    pub client_id: u64,
    /// Expiry, Unix seconds.
    pub expires_unix_s: u64,
    /// Addresses the token is valid for (1 to [`SERVERS_MAX`]).
    pub servers: &'a [SocketAddr],
    /// Up to [`USER_DATA_MAX`] bytes for the game server.
    pub user_data: &'a [u8],
}

fn aad(expires: u64) -> [u8; 11] {
    let mut a = [0u8; 11];
    a[0] = TOKEN_VERSION;
    a[1..3].copy_from_slice(&PROTOCOL_ID.to_le_bytes());
    a[3..11].copy_from_slice(&expires.to_le_bytes());
    a
}

fn put_addr(out: &mut [u8], addr: SocketAddr) {
    let (family, ip) = match addr.ip() {
        IpAddr::V4(v4) => {
            let mut ip = [0u8; 16];
            ip[..4].copy_from_slice(&v4.octets());
            (4, ip)
        }
        IpAddr::V6(v6) => (6, v6.octets()),
    };
    out[0] = family;
    out[1..17].copy_from_slice(&ip);
    out[17..19].copy_from_slice(&addr.port().to_le_bytes());
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = b[1..17].try_into().ok()?;
    let port = u16::from_le_bytes([b[17], b[18]]);
    let ip = match b[0] {
        4 => {
            if ip[4..].iter().any(|x| *x != 0) {
                return None;
            }
            IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
        }
        6 => IpAddr::V6(Ipv6Addr::from(ip)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn put_servers(out: &mut [u8], servers: &[SocketAddr]) {
    out[0] = servers.len() as u8;
    for (i, s) in servers.iter().enumerate() {
        put_addr(&mut out[1 + i * ADDR_LEN..1 + (i + 1) * ADDR_LEN], *s);
    }
}

/// Reads a server list; unused slots must be zero, so a token has one
/// encoding.
fn get_servers(b: &[u8]) -> Option<Vec<SocketAddr>> {
    let n = usize::from(b[0]);
    if n == 0 || n > SERVERS_MAX {
        return None;
    }
    let slots = &b[1..1 + SERVERS_MAX * ADDR_LEN];
    let mut out = Vec::with_capacity(n);
    for (i, slot) in slots.chunks_exact(ADDR_LEN).enumerate() {
        if i < n {
            out.push(get_addr(slot)?);
        } else if slot.iter().any(|x| *x != 0) {
            return None;
        }
    }
    Some(out)
}

impl ConnectToken {
    /// Mints a token. `session_keys` and `nonce` must be fresh random bytes
    /// (the caller's generator: this crate never draws randomness itself).
    pub fn mint(
        key: &TokenKey,
        request: &TokenRequest<'_>,
        session_keys: SessionKeys,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Self, TokenError> {
        if request.client_id == 0 {
            return Err(TokenError::OutOfBounds("client id 0"));
        }
        if request.user_data.len() > USER_DATA_MAX {
            return Err(TokenError::OutOfBounds("more than 256 bytes of user data"));
        }
        if request.servers.is_empty() || request.servers.len() > SERVERS_MAX {
            return Err(TokenError::OutOfBounds("1 to 8 server addresses"));
        }
        let mut private = [0u8; PRIVATE_LEN];
        private[0..8].copy_from_slice(&request.client_id.to_le_bytes());
        private[8..10].copy_from_slice(&(request.user_data.len() as u16).to_le_bytes());
        private[10..10 + request.user_data.len()].copy_from_slice(request.user_data);
        let at = 10 + USER_DATA_MAX;
        put_servers(
            &mut private[at..at + 1 + SERVERS_MAX * ADDR_LEN],
            request.servers,
        );
        let at = at + 1 + SERVERS_MAX * ADDR_LEN;
        private[at..at + KEY_LEN].copy_from_slice(&session_keys.client_to_server);
        private[at + KEY_LEN..].copy_from_slice(&session_keys.server_to_client);
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.0));
        let tag = cipher
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &aad(request.expires_unix_s),
                &mut private,
            )
            .map_err(|_| TokenError::BadContent)?;
        let mut sealed = Box::new([0u8; SEALED_TOKEN_LEN]);
        sealed[0] = TOKEN_VERSION;
        sealed[1..9].copy_from_slice(&request.expires_unix_s.to_le_bytes());
        sealed[9..9 + NONCE_LEN].copy_from_slice(&nonce);
        sealed[9 + NONCE_LEN..9 + NONCE_LEN + PRIVATE_LEN].copy_from_slice(&private);
        sealed[SEALED_TOKEN_LEN - TAG_LEN..].copy_from_slice(&tag);
        Ok(Self {
            client_id: request.client_id,
            expires_unix_s: request.expires_unix_s,
            servers: request.servers.to_vec(),
            keys: session_keys,
            sealed,
        })
    }

    /// The whole token, for the client ([`TOKEN_LEN`] bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; TOKEN_LEN];
        out[0] = TOKEN_VERSION;
        out[1..9].copy_from_slice(&self.client_id.to_le_bytes());
        out[9..17].copy_from_slice(&self.expires_unix_s.to_le_bytes());
        put_servers(&mut out[17..18 + SERVERS_MAX * ADDR_LEN], &self.servers);
        let at = 18 + SERVERS_MAX * ADDR_LEN;
        out[at..at + KEY_LEN].copy_from_slice(&self.keys.client_to_server);
        out[at + KEY_LEN..at + 2 * KEY_LEN].copy_from_slice(&self.keys.server_to_client);
        out[at + 2 * KEY_LEN..].copy_from_slice(&self.sealed[..]);
        out
    }

    /// Reads a token written by [`Self::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenError> {
        if bytes.len() != TOKEN_LEN || bytes[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed);
        }
        let client_id = u64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes"));
        let expires_unix_s = u64::from_le_bytes(bytes[9..17].try_into().expect("8 bytes"));
        let servers =
            get_servers(&bytes[17..18 + SERVERS_MAX * ADDR_LEN]).ok_or(TokenError::Malformed)?;
        let at = 18 + SERVERS_MAX * ADDR_LEN;
        let keys = SessionKeys {
            client_to_server: bytes[at..at + KEY_LEN].try_into().expect("32 bytes"),
            server_to_client: bytes[at + KEY_LEN..at + 2 * KEY_LEN]
                .try_into()
                .expect("32 bytes"),
        };
        let sealed: [u8; SEALED_TOKEN_LEN] = bytes[at + 2 * KEY_LEN..]
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        if sealed[0] != TOKEN_VERSION
            || u64::from_le_bytes(sealed[1..9].try_into().expect("8 bytes")) != expires_unix_s
            || client_id == 0
        {
            return Err(TokenError::Malformed);
        }
        Ok(Self {
            client_id,
            expires_unix_s,
            servers,
            keys,
            sealed: Box::new(sealed),
        })
    }

    /// The token as hex text (for files, environment variables, and the
    /// command line).
    pub fn to_hex(&self) -> String {
        to_hex(&self.to_bytes())
    }

    /// Reads a token written by [`Self::to_hex`].
    pub fn from_hex(text: &str) -> Result<Self, TokenError> {
        Self::from_bytes(&from_hex(text.trim()).ok_or(TokenError::Malformed)?)
    }
}

/// Opens the sealed part a client presented: checks its version and
/// expiry (`now_unix_s`), then its seal under each of `keys` (the current
/// key first, then the previous one). The caller checks the address.
pub fn open_sealed(
    sealed: &[u8],
    keys: &[TokenKey],
    now_unix_s: u64,
) -> Result<TokenClaims, TokenError> {
    if sealed.len() != SEALED_TOKEN_LEN || sealed[0] != TOKEN_VERSION {
        return Err(TokenError::Malformed);
    }
    let expires = u64::from_le_bytes(sealed[1..9].try_into().expect("8 bytes"));
    // Cheap checks first: an expired token costs no decryption.
    if now_unix_s >= expires {
        return Err(TokenError::Expired);
    }
    let nonce = XNonce::from_slice(&sealed[9..9 + NONCE_LEN]);
    let tag = Tag::from_slice(&sealed[SEALED_TOKEN_LEN - TAG_LEN..]);
    let aad = aad(expires);
    let mut private = [0u8; PRIVATE_LEN];
    let opened = keys.iter().any(|k| {
        private.copy_from_slice(&sealed[9 + NONCE_LEN..9 + NONCE_LEN + PRIVATE_LEN]);
        XChaCha20Poly1305::new(Key::from_slice(&k.0))
            .decrypt_in_place_detached(nonce, &aad, &mut private, tag)
            .is_ok()
    });
    if !opened {
        return Err(TokenError::BadSeal);
    }
    let client_id = u64::from_le_bytes(private[0..8].try_into().expect("8 bytes"));
    let len = usize::from(u16::from_le_bytes([private[8], private[9]]));
    if client_id == 0 || len > USER_DATA_MAX {
        return Err(TokenError::BadContent);
    }
    let at = 10 + USER_DATA_MAX;
    let servers =
        get_servers(&private[at..at + 1 + SERVERS_MAX * ADDR_LEN]).ok_or(TokenError::BadContent)?;
    let at = at + 1 + SERVERS_MAX * ADDR_LEN;
    Ok(TokenClaims {
        client_id,
        expires_unix_s: expires,
        user_data: private[10..10 + len].to_vec(),
        servers,
        keys: SessionKeys {
            client_to_server: private[at..at + KEY_LEN].try_into().expect("32 bytes"),
            server_to_client: private[at + KEY_LEN..at + 2 * KEY_LEN]
                .try_into()
                .expect("32 bytes"),
        },
    })
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let t = text.as_bytes();
    if t.len() % 2 != 0 {
        return None;
    }
    t.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: TokenKey = TokenKey([7; KEY_LEN]);
    const OLD: TokenKey = TokenKey([8; KEY_LEN]);

    fn keys(b: u8) -> SessionKeys {
        SessionKeys {
            client_to_server: [b; KEY_LEN],
            server_to_client: [b.wrapping_add(1); KEY_LEN],
        }
    }

    fn token(key: &TokenKey, expires: u64) -> ConnectToken {
        let servers = [
            "127.0.0.1:7777".parse().unwrap(),
            "[::1]:7777".parse().unwrap(),
        ];
        ConnectToken::mint(
            key,
            &TokenRequest {
                client_id: 42,
                expires_unix_s: expires,
                servers: &servers,
                user_data: b"account=alice",
            },
            keys(3),
            [9; NONCE_LEN],
        )
        .unwrap()
    }

    #[test]
    fn a_minted_token_opens_with_its_key_or_as_the_previous_one() {
        let t = token(&KEY, 1000);
        let c = open_sealed(&t.sealed[..], std::slice::from_ref(&KEY), 999).unwrap();
        assert_eq!(c.client_id, 42);
        assert_eq!(c.user_data, b"account=alice");
        assert_eq!(c.servers, t.servers);
        assert_eq!(c.keys, keys(3));
        // Rotated: the token's key is now the previous one.
        let rotated = [TokenKey([1; KEY_LEN]), KEY];
        assert!(open_sealed(&t.sealed[..], &rotated, 999).is_ok());
        // Two rotations later it is refused.
        assert_eq!(
            open_sealed(&t.sealed[..], &[TokenKey([1; KEY_LEN]), OLD], 999),
            Err(TokenError::BadSeal)
        );
    }

    #[test]
    fn expiry_is_checked_and_cannot_be_extended() {
        let t = token(&KEY, 1000);
        assert_eq!(
            open_sealed(&t.sealed[..], std::slice::from_ref(&KEY), 1000),
            Err(TokenError::Expired)
        );
        let mut forged = t.sealed.clone();
        forged[1..9].copy_from_slice(&2000u64.to_le_bytes());
        assert_eq!(
            open_sealed(&forged[..], std::slice::from_ref(&KEY), 1500),
            Err(TokenError::BadSeal)
        );
    }

    #[test]
    fn a_token_survives_its_text_form_and_bad_text_is_refused() {
        let t = token(&KEY, 1000);
        assert_eq!(ConnectToken::from_hex(&t.to_hex()), Ok(t.clone()));
        assert_eq!(ConnectToken::from_hex("zz"), Err(TokenError::Malformed));
        let mut b = t.to_bytes();
        b.pop();
        assert_eq!(ConnectToken::from_bytes(&b), Err(TokenError::Malformed));
        assert_eq!(TokenKey::from_hex(&KEY.to_hex()), Ok(KEY));
        assert_eq!(TokenKey::from_hex("abc"), Err(TokenError::BadKey));
    }

    #[test]
    fn mint_requests_out_of_bounds_are_refused() {
        let servers: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap(); 9];
        for (client_id, servers, user_data) in [
            (0, &servers[..1], &[][..]),
            (1, &servers[..0], &[][..]),
            (1, &servers[..], &[][..]),
            (1, &servers[..1], &[0u8; 257][..]),
        ] {
            let r = TokenRequest {
                client_id,
                expires_unix_s: 5,
                servers,
                user_data,
            };
            assert!(matches!(
                ConnectToken::mint(&KEY, &r, keys(1), [0; NONCE_LEN]),
                Err(TokenError::OutOfBounds(_))
            ));
        }
    }

    proptest! {
        #[test]
        fn any_flipped_bit_of_a_sealed_token_is_refused(i in 0..SEALED_TOKEN_LEN, bit in 0u8..8) {
            let t = token(&KEY, 1000);
            let mut s = t.sealed.clone();
            s[i] ^= 1 << bit;
            prop_assert!(open_sealed(&s[..], std::slice::from_ref(&KEY), 10).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_open_or_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            prop_assert!(open_sealed(&bytes, std::slice::from_ref(&KEY), 0).is_err());
            let _ = ConnectToken::from_bytes(&bytes);
        }
    }
}

/// Which endpoint holds each player's session, shared by the endpoints of
/// one server (a node's shards each run their own endpoint on one port):
/// a token's player gets one session across all of them, not one per
/// endpoint. Bounded by the sessions the endpoints hold.
#[derive(Debug, Default)]
pub struct PlayerGate {
    held: std::sync::Mutex<std::collections::HashMap<u64, (u32, u32)>>,
}

impl PlayerGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, (u32, u32)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True if `player`'s session is held by an endpoint other than
    /// `endpoint`.
    pub(crate) fn held_elsewhere(&self, player: u64, endpoint: u32) -> bool {
        self.lock().get(&player).is_some_and(|h| h.0 != endpoint)
    }

    /// `endpoint`'s session `session` now holds `player`.
    pub(crate) fn enter(&self, player: u64, endpoint: u32, session: u32) {
        self.lock().insert(player, (endpoint, session));
    }

    /// `endpoint`'s session `session` of `player` ended.
    pub(crate) fn exit(&self, player: u64, endpoint: u32, session: u32) {
        let mut held = self.lock();
        if held.get(&player) == Some(&(endpoint, session)) {
            held.remove(&player);
        }
    }

    /// Players in a session now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
