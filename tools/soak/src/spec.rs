//! What the parent hands each child process, and the record file every process writes.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apikeys_db::{ApiKeyClient, ClientBuilder};
use apikeys_soak::events::Event;
use serde::{Deserialize, Serialize};

/// Set in a child's environment: `replica` or `admin`.
pub const ROLE_ENV: &str = "APIKEYS_SOAK_ROLE";
/// Set in a child's environment: its [`Spec`] as JSON.
pub const SPEC_ENV: &str = "APIKEYS_SOAK_SPEC";

/// A child process's configuration.
#[derive(Clone, Serialize, Deserialize)]
pub struct Spec {
    /// The replica's number (the admin's is the replica count).
    pub r: u32,
    /// How many times this replica was started before (a rolling restart starts the next).
    pub generation: u32,
    /// The database: through the proxy for a replica, direct for the admin.
    pub url: String,
    /// The run's directory (setup, keys, records).
    pub dir: PathBuf,
    /// The run's seed.
    pub seed: u64,
    /// The client's clock offset from the host's.
    pub offset_ms: i64,
    /// The signing secrets, current first, with their versions.
    pub secrets: Vec<(u32, String)>,
    /// Concurrent tasks (replica) checking keys.
    pub tasks: u32,
    /// Checks per second (replica, all tasks) or changes per second (admin).
    pub rate: f64,
    /// The cache's bound.
    pub staleness_ms: i64,
    /// The clients' reconnect interval.
    pub reconnect_ms: i64,
    /// The Zipf exponent of key draws.
    pub zipf: f64,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field("r", &self.r)
            .field("generation", &self.generation)
            .field("url", &"[redacted]")
            .field("secrets", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// Connect, acquire and statement timeouts of every soak client.
pub const TIMEOUT: Duration = Duration::from_secs(2);

impl Spec {
    /// The client's builder: database, secrets, clock, timeouts.
    pub fn builder(&self) -> ClientBuilder {
        let mut b = ApiKeyClient::builder().database_url(&self.url);
        for (i, (version, secret)) in self.secrets.iter().enumerate() {
            b = if i == 0 {
                b.signing_secret(secret.as_bytes()).signing_secret_version(*version)
            } else {
                b.previous_signing_secret(*version, secret.as_bytes())
            };
        }
        let offset = chrono::TimeDelta::milliseconds(self.offset_ms);
        b.clock(move || chrono::Utc::now() + offset)
            .connect_timeout(TIMEOUT)
            .acquire_timeout(TIMEOUT)
            .statement_timeout(TIMEOUT)
            .reconnect_interval(Duration::from_millis(self.reconnect_ms.unsigned_abs()))
    }
}

/// A record file: one [`Event`] per line, appended.
#[derive(Debug)]
pub struct Record(Mutex<BufWriter<File>>);

impl Record {
    /// Opens `path` for appending (creating it).
    ///
    /// # Errors
    /// If it cannot be opened.
    pub fn append(path: &Path) -> std::io::Result<Record> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Record(Mutex::new(BufWriter::with_capacity(1 << 16, file))))
    }

    /// Writes one event.
    pub fn write(&self, event: &Event) {
        let mut w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // A full disk shows as missing lines, which the checks then report.
        if serde_json::to_writer(&mut *w, event).is_ok() {
            let _ = w.write_all(b"\n");
        }
    }

    /// Writes what is buffered to the file.
    pub fn flush(&self) {
        let _ = self.0.lock().unwrap_or_else(PoisonError::into_inner).flush();
    }
}

/// Sends the process's `tracing` output (DEBUG and up, every crate) to `path`: the soak
/// scans it for key material afterwards.
pub fn trace_to(path: &Path) {
    if let Ok(file) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(Mutex::new(file))
            .try_init();
    }
}

/// The keys' plaintexts, by index, from the run's directory.
///
/// # Errors
/// If the file cannot be read.
pub fn read_keys(dir: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(dir.join(KEYS_FILE))?.lines().map(str::to_owned).collect())
}

/// The file of plaintext keys (the one file of the run that holds key material).
pub const KEYS_FILE: &str = "keys.secret";
/// The plaintexts of the keys the admin's rolls issued.
pub const ROLLED_FILE: &str = "rolled.secret";
/// Set in the admin's environment: the run's directory.
pub const DIR_ENV: &str = "APIKEYS_SOAK_DIR";
/// The run's [`Setup`](apikeys_soak::check::Setup).
pub const SETUP_FILE: &str = "setup.json";

/// A flag set once the parent closes this process's stdin (its signal to stop).
pub fn stop_on_stdin_eof() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let set = Arc::clone(&stop);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        set.store(true, Ordering::SeqCst);
    });
    stop
}
