//! API keys: who a caller is (a tenant and a role) and how fast it may call.
//!
//! Keys are configured as TOML, in a file (`ENGRAM_API_KEYS_FILE`, reloaded when its content
//! changes and on SIGHUP, without a restart) or inline (`ENGRAM_API_KEYS`, read once):
//!
//! ```toml
//! [[keys]]
//! name = "acme-backend"   # in logs and errors; never the key itself
//! tenant = "acme"
//! role = "write"          # read | write | admin
//! sha256 = "…"            # hex SHA-256 of the key: the key itself is never stored
//! rate = 200              # requests per second (optional; ENGRAM_RATE_LIMIT otherwise)
//! burst = 400             # optional; twice the rate otherwise
//! ```
//!
//! `engram keys new --tenant acme --role write` prints a fresh key and its entry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use engram_domain::model::TenantId;
use engram_domain::{Error, Result};
use parking_lot::RwLock;
use sha2::{Digest as _, Sha256};

/// What a key may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Recall, Get, List.
    Read,
    /// And Remember, Update, Forget.
    Write,
    /// Everything, including the administrative calls.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    /// The role a public method needs; unknown methods need admin.
    pub fn needed_for(method: &str) -> Role {
        match method {
            "Recall" | "Get" | "List" | "BuildContext" => Role::Read,
            // Converse remembers the turn.
            "Remember" | "Update" | "Forget" | "Converse" => Role::Write,
            _ => Role::Admin,
        }
    }
}

/// Who is calling, as the gateway's handlers see it (a request extension).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's name (`anonymous` when authentication is off).
    pub key_name: Arc<str>,
    pub tenant: TenantId,
    pub role: Role,
    pub rate: Rate,
}

/// A token bucket's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second; 0 is unlimited.
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    tenant: String,
    role: Role,
    sha256: String,
    rate: Option<f64>,
    burst: Option<f64>,
}

/// A set of keys, by the SHA-256 of the key.
#[derive(Debug, Default)]
pub struct Keys {
    by_hash: HashMap<[u8; 32], Caller>,
}

impl Keys {
    /// Parse a key file's text; `source` names it in errors. `default_rate` applies to keys
    /// without a rate.
    pub fn parse(text: &str, source: &str, default_rate: Rate) -> Result<Self> {
        let file: KeyFile = toml::from_str(text)
            .map_err(|e| Error::invalid(source, format!("not a valid key file: {e}")))?;
        let mut by_hash = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (i, entry) in file.keys.into_iter().enumerate() {
            let field = format!("{source}: keys[{i}] ({})", entry.name);
            let bad = |why: String| Error::invalid(&field, why);
            if entry.name.is_empty() || !names.insert(entry.name.clone()) {
                return Err(bad("name must be present and unique".into()));
            }
            let tenant = TenantId::parse(&entry.tenant).map_err(|e| bad(format!("tenant: {e}")))?;
            let hash: [u8; 32] = hex::decode(entry.sha256.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| {
                    bad("sha256 must be 64 hex digits (the SHA-256 of the key)".into())
                })?;
            let per_second = entry.rate.unwrap_or(default_rate.per_second);
            let burst = entry.burst.unwrap_or(if entry.rate.is_some() {
                per_second * 2.0
            } else {
                default_rate.burst
            });
            let valid =
                per_second.is_finite() && per_second >= 0.0 && burst.is_finite() && burst >= 1.0;
            if !valid {
                return Err(bad("rate must be ≥ 0 and burst ≥ 1".into()));
            }
            let caller = Caller {
                key_name: entry.name.into(),
                tenant,
                role: entry.role,
                rate: Rate { per_second, burst },
            };
            if by_hash.insert(hash, caller).is_some() {
                return Err(bad("the same key is listed twice".into()));
            }
        }
        Ok(Self { by_hash })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The caller a presented key belongs to.
    pub fn lookup(&self, key: &str) -> Option<&Caller> {
        self.by_hash.get(&hash(key))
    }
}

/// The SHA-256 of a key, as stored in key files.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Where keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    Inline(String),
}

/// The keys in force, replaced whole on reload.
#[derive(Debug)]
pub struct KeyStore {
    source: KeySource,
    default_rate: Rate,
    keys: RwLock<Arc<Keys>>,
    /// SHA-256 of the file's content the keys in force were read from (not its mtime: two
    /// writes within one mtime tick would keep the first).
    content: RwLock<Option<[u8; 32]>>,
}

impl KeyStore {
    /// Load the keys; an unreadable or invalid source fails start-up with the reason.
    pub fn load(source: KeySource, default_rate: Rate) -> Result<Self> {
        let (keys, content) = read(&source, default_rate)?;
        Ok(Self {
            source,
            default_rate,
            keys: RwLock::new(Arc::new(keys)),
            content: RwLock::new(content),
        })
    }

    pub fn keys(&self) -> Arc<Keys> {
        Arc::clone(&self.keys.read())
    }

    /// Read the file again and take its keys if its content changed (or `force`). A file that
    /// no longer parses keeps the keys in force, and the error says why. Blocking file I/O:
    /// [`KeyStore::watch`] calls it off the runtime threads.
    pub fn reload(&self, force: bool) -> Result<bool> {
        let KeySource::File(path) = &self.source else {
            return Ok(false);
        };
        let text = read_file(path)?;
        let content = Some(<[u8; 32]>::from(Sha256::digest(text.as_bytes())));
        if !force && content == *self.content.read() {
            return Ok(false);
        }
        let keys = Keys::parse(&text, &file_source(path), self.default_rate)?;
        tracing::info!(file = %path.display(), keys = keys.len(), "API keys reloaded");
        *self.keys.write() = Arc::new(keys);
        *self.content.write() = content;
        Ok(true)
    }

    /// Reload when the file changes (checked every `interval`) and on SIGHUP, until the store
    /// is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        if !matches!(self.source, KeySource::File(_)) {
            return;
        }
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let forced = {
                    let hup = async {
                        match hangup.as_mut() {
                            Some(signal) => {
                                signal.recv().await;
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        () = tokio::time::sleep(interval) => false,
                        () = hup => true,
                    }
                };
                #[cfg(not(unix))]
                let forced = {
                    tokio::time::sleep(interval).await;
                    false
                };
                let Some(store) = store.upgrade() else {
                    return;
                };
                match tokio::task::spawn_blocking(move || store.reload(forced)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "API key file not reloaded; the keys in force stay");
                    }
                    Err(e) => tracing::error!(error = %e, "API key reload failed"),
                }
            }
        });
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "read once at start-up, then only from the reload task's spawn_blocking"
)]
fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        Error::invalid(
            "ENGRAM_API_KEYS_FILE",
            format!("cannot read {}: {e}", path.display()),
        )
    })
}

fn file_source(path: &Path) -> String {
    format!("ENGRAM_API_KEYS_FILE {}", path.display())
}

/// The keys of `source` and, for a file, the SHA-256 of its content.
fn read(source: &KeySource, default_rate: Rate) -> Result<(Keys, Option<[u8; 32]>)> {
    match source {
        KeySource::Inline(text) => Ok((Keys::parse(text, "ENGRAM_API_KEYS", default_rate)?, None)),
        KeySource::File(path) => {
            let text = read_file(path)?;
            let content = Sha256::digest(text.as_bytes()).into();
            Ok((
                Keys::parse(&text, &file_source(path), default_rate)?,
                Some(content),
            ))
        }
    }
}

/// A new random key (256 bits, `egk_` then 64 hex digits) and its key file entry.
pub fn new_key(name: &str, tenant: &TenantId, role: Role) -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let key = format!("egk_{}", hex::encode(bytes));
    let entry = format!(
        "[[keys]]\nname = {name:?}\ntenant = {:?}\nrole = {:?}\nsha256 = {:?}\n",
        tenant.as_str(),
        role.as_str(),
        hex::encode(hash(&key)),
    );
    (key, entry)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "synchronous tests")]
mod tests {
    use super::*;

    const DEFAULT: Rate = Rate {
        per_second: 100.0,
        burst: 200.0,
    };

    #[test]
    fn a_changed_file_is_reloaded_even_within_one_mtime_tick() {
        let dir = std::env::temp_dir().join(format!("engram-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        let tenant = TenantId::parse("acme").unwrap();
        let (first, entry) = new_key("first", &tenant, Role::Read);
        std::fs::write(&path, &entry).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let store = KeyStore::load(KeySource::File(path.clone()), DEFAULT).unwrap();
        assert!(store.keys().lookup(&first).is_some());
        assert!(
            !store.reload(false).unwrap(),
            "unchanged content is not reloaded"
        );
        // A second write with the same modification time: the content tells.
        let (second, entry) = new_key("second", &tenant, Role::Read);
        std::fs::write(&path, &entry).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(store.reload(false).unwrap());
        assert!(store.keys().lookup(&first).is_none());
        assert!(store.keys().lookup(&second).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_map_to_their_tenant_role_and_rate() {
        let tenant = TenantId::parse("acme").unwrap();
        let (key, entry) = new_key("acme-app", &tenant, Role::Write);
        let text = format!("{entry}rate = 5\n");
        let keys = Keys::parse(&text, "test", DEFAULT).unwrap();
        let caller = keys.lookup(&key).unwrap();
        assert_eq!(caller.tenant, tenant);
        assert_eq!(caller.role, Role::Write);
        assert_eq!(
            caller.rate,
            Rate {
                per_second: 5.0,
                burst: 10.0
            }
        );
        assert!(keys.lookup("egk_other").is_none());
        assert!(!text.contains(&key), "only the hash is stored");
    }

    #[test]
    fn bad_key_files_name_the_entry_and_the_cause() {
        for (text, expected) in [
            (
                "[[keys]]\nname='a'\ntenant='t'\nrole='owner'\nsha256='00'",
                "not a valid key file",
            ),
            (
                "[[keys]]\nname='a'\ntenant='t'\nrole='read'\nsha256='00'",
                "keys[0] (a): sha256",
            ),
            (
                "[[keys]]\nname='a'\ntenant='t'\nrole='read'\nsha256='00'\nextra=1",
                "extra",
            ),
        ] {
            let error = Keys::parse(text, "test", DEFAULT).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn roles_nest() {
        assert!(Role::Admin > Role::Write && Role::Write > Role::Read);
        assert_eq!(Role::needed_for("Recall"), Role::Read);
        assert_eq!(Role::needed_for("Forget"), Role::Write);
        assert_eq!(Role::needed_for("Purge"), Role::Admin);
    }
}
