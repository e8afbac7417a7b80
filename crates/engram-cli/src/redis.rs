//! A `redis-server` child process: the local Redis of `engram up`, and the private Redis each
//! test starts on a free port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use engram_domain::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// How the server keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing on disk (tests of caches).
    None,
    /// Append-only file in the data directory, fsynced every second.
    AppendOnly,
    /// Append-only file fsynced on every write.
    AppendOnlyAlways,
}

#[derive(Debug)]
pub struct RedisProcess {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    persistence: Persistence,
}

const STARTUP: Duration = Duration::from_secs(10);

impl RedisProcess {
    /// Start `redis-server` on `port` (a free one if `None`) with its files in `dir`, and wait
    /// until it answers PING.
    pub async fn start(dir: &Path, port: Option<u16>, persistence: Persistence) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::unavailable(format!("cannot create {}: {e}", dir.display())))?;
        let port = match port {
            Some(port) => port,
            None => free_port()?,
        };
        let mut this = Self {
            child: None,
            port,
            dir: dir.to_path_buf(),
            persistence,
        };
        this.spawn().await?;
        Ok(this)
    }

    async fn spawn(&mut self) -> Result<()> {
        if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
            return Err(Error::unavailable(format!(
                "port {} is already in use; choose another Redis port or set ENGRAM_REDIS_URL to use that Redis",
                self.port
            )));
        }
        let (appendonly, fsync) = match self.persistence {
            Persistence::None => ("no", "everysec"),
            Persistence::AppendOnly => ("yes", "everysec"),
            Persistence::AppendOnlyAlways => ("yes", "always"),
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", appendonly, "--appendfsync", fsync])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Error::unavailable(format!(
                    "cannot start redis-server ({e}); install it (Debian: apt-get install redis-server) or set ENGRAM_REDIS_URL to an existing Redis"
                ))
            })?;
        self.child = Some(child);
        self.wait_until_ready().await
    }

    async fn wait_until_ready(&mut self) -> Result<()> {
        let started = tokio::time::Instant::now();
        loop {
            if ping(self.addr()).await {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(Error::unavailable(format!(
                    "redis-server exited with {status} while starting; see {}",
                    self.dir.join("redis.log").display()
                )));
            }
            if started.elapsed() > STARTUP {
                return Err(Error::unavailable(format!(
                    "redis-server on port {} did not answer within {STARTUP:?}",
                    self.port
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kill the server at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stop the server cleanly: it writes out its append-only file first.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(mut stream) = tokio::net::TcpStream::connect(self.addr()).await {
            let _ = stream.write_all(b"SHUTDOWN\r\n").await;
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Start it again on the same port and directory (after [`Self::kill`] or [`Self::stop`]).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.spawn().await
    }
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::unavailable(format!("cannot find a free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::unavailable(format!("cannot find a free port: {e}")))
}

async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut reply)).await,
        Ok(Ok(_)) if &reply == b"+PONG\r\n"
    )
}
