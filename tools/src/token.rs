//! `tessera token`: keys and connect tokens for operators and tests (a
//! game's login service mints tokens with the library call,
//! `tessera_net::token::ConnectToken::mint`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use tessera_net::token::{ConnectToken, SessionKeys, TokenKey, TokenRequest};

/// Arguments of `tessera token`.
#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a fresh random key (64 hex digits) for `serve --key FILE`.
    Key,
    /// Mint a connect token (printed as hex) for one player.
    Mint(MintArgs),
}

#[derive(Args, Debug)]
struct MintArgs {
    /// The key file the servers use (its first line is the current key).
    #[arg(long)]
    key: PathBuf,
    /// The player's id (not 0); reconnects with this id are the same
    /// player.
    #[arg(long)]
    client_id: u64,
    /// A server address the token is valid for (repeat for more, up to 8).
    #[arg(long = "server", required = true)]
    servers: Vec<SocketAddr>,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    expires_in: u64,
    /// Account data handed to the game server (up to 256 bytes).
    #[arg(long, default_value = "")]
    user_data: String,
}

/// Runs `tessera token`.
pub fn run(args: TokenArgs) -> Result<(), String> {
    match args.command {
        TokenCommand::Key => {
            println!("{}", TokenKey(random_bytes()?).to_hex());
            Ok(())
        }
        TokenCommand::Mint(m) => {
            let keys = read_keys(&m.key)?;
            let token = mint(
                &keys[0],
                m.client_id,
                &m.servers,
                m.expires_in,
                m.user_data.as_bytes(),
            )?;
            println!("{}", token.to_hex());
            Ok(())
        }
    }
}

/// Reads a key file: the current key on its first line, optionally the
/// previous one on the second (rotation); `#` starts a comment line.
pub fn read_keys(path: &Path) -> Result<Vec<TokenKey>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    let keys: Vec<TokenKey> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| TokenKey::from_hex(l).map_err(|e| format!("{}: {e}", path.display())))
        .collect::<Result<_, _>>()?;
    match keys.len() {
        0 => Err(format!("{}: no key in the file", path.display())),
        1 | 2 => Ok(keys),
        n => Err(format!(
            "{}: {n} keys; a key file holds the current key and at most the previous one",
            path.display()
        )),
    }
}

/// Where the development key lives: `$TESSERA_DEV_KEY`, else
/// `tessera-dev-<uid>.key` in the temporary directory. Every development
/// server of this user shares it, and the local `client` and `sim` read
/// it, so a development setup stays two commands.
pub fn dev_key_path() -> PathBuf {
    match std::env::var_os("TESSERA_DEV_KEY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        // SAFETY: getuid cannot fail and touches no memory.
        _ => std::env::temp_dir().join(format!("tessera-dev-{}.key", unsafe { libc::getuid() })),
    }
}

/// The development key at `path`, created (mode 0600) when missing. Two
/// servers starting at once agree on one key: the file appears whole or
/// not at all. A file another user owns or can write is refused: whoever
/// can write the key can join as anyone.
pub fn dev_key(path: &Path) -> Result<TokenKey, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if !path.exists() {
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)
                .map_err(|e| format!("cannot write the development key {}: {e}", temp.display()))?;
            writeln!(
                f,
                "# tessera development key: loopback servers without --key use it\n{}",
                TokenKey(random_bytes()?).to_hex()
            )
            .map_err(|e| format!("cannot write the development key {}: {e}", temp.display()))?;
        }
        // A hard link fails if another process made the file first: keep
        // theirs.
        let linked = std::fs::hard_link(&temp, path);
        let _ = std::fs::remove_file(&temp);
        if let Err(e) = linked {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(format!(
                    "cannot create the development key {}: {e}",
                    path.display()
                ));
            }
        }
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the development key {}: {e}", path.display()))?;
    // SAFETY: as above.
    let me = unsafe { libc::getuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "the development key {} belongs to another user or others can write it: remove it, or set TESSERA_DEV_KEY",
            path.display()
        ));
    }
    Ok(read_keys(path)?.remove(0))
}

/// The development key for a client dialing `server`: only for loopback
/// addresses, and only if a development server made one.
pub fn dev_key_for(server: SocketAddr) -> Option<TokenKey> {
    if !server.ip().is_loopback() {
        return None;
    }
    let path = dev_key_path();
    path.exists().then(|| dev_key(&path).ok()).flatten()
}

/// The key of a cluster's links: the file's, or, for a cluster whose
/// every address in `addresses` is loopback, the development key. A
/// cluster reachable off loopback needs a key file.
pub fn cluster_key(
    file: Option<&Path>,
    addresses: &[SocketAddr],
) -> Result<tessera_runtime::cluster::ClusterKey, String> {
    let keys = match file {
        Some(path) => read_keys(path)?,
        None if addresses.iter().all(|a| a.ip().is_loopback()) => {
            vec![dev_key(&dev_key_path())?]
        }
        None => {
            return Err(
                "cluster links off loopback need --cluster-key FILE (the same file on the coordinators and every node; `tessera token key > FILE` makes one)"
                    .into(),
            )
        }
    };
    Ok(tessera_runtime::cluster::ClusterKey { keys })
}

/// Mints a token valid `expires_in` seconds from now.
pub fn mint(
    key: &TokenKey,
    client_id: u64,
    servers: &[SocketAddr],
    expires_in: u64,
    user_data: &[u8],
) -> Result<ConnectToken, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    ConnectToken::mint(
        key,
        &TokenRequest {
            client_id,
            expires_unix_s: now.saturating_add(expires_in),
            servers,
            user_data,
        },
        SessionKeys {
            client_to_server: random_bytes()?,
            server_to_client: random_bytes()?,
        },
        random_bytes()?,
    )
    .map_err(|e| e.to_string())
}

/// Bytes from the OS's generator: session keys and nonces must not be
/// guessable.
fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let v = tessera_net::driver::os_seed()
            .map_err(|e| format!("no OS randomness: {e}"))?
            .to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_name_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("tessera-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let k = "ab".repeat(32);
        let two = file(
            "two",
            &format!("# rotated on Monday\n{k}\n{}\n", "cd".repeat(32)),
        );
        assert_eq!(read_keys(&two).unwrap().len(), 2);
        let e = read_keys(&file("empty", "# nothing\n")).unwrap_err();
        assert!(e.contains("no key"), "{e}");
        let e = read_keys(&file("bad", "xyz\n")).unwrap_err();
        assert!(e.contains("64 hex digits"), "{e}");
        let e = read_keys(&file("three", &format!("{k}\n{k}\n{k}\n"))).unwrap_err();
        assert!(e.contains("at most the previous"), "{e}");
        let e = read_keys(&dir.join("missing")).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
        let keys = read_keys(&two).unwrap();
        let server: SocketAddr = "127.0.0.1:7777".parse().unwrap();
        let t = mint(&keys[0], 9, &[server], 60, b"bob").unwrap();
        assert_eq!(ConnectToken::from_hex(&t.to_hex()).unwrap(), t);
        assert!(mint(&keys[0], 0, &[server], 60, b"").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_development_key_is_made_once_and_then_shared() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tessera-devkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev.key");
        let first = dev_key(&path).unwrap();
        assert_eq!(dev_key(&path).unwrap(), first, "read back, not made again");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = dev_key(&path).unwrap_err();
        assert!(e.contains("others can write"), "{e}");
        let v6: SocketAddr = "[2001:db8::1]:7777".parse().unwrap();
        assert!(dev_key_for(v6).is_none(), "never for a remote server");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
