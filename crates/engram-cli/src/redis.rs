//! A `redis-server` child process: the local Redis of `engram up`, and the private Redis each
//! test starts on a free port.
//!
//! The child dies with its parent: it is started with Linux's parent-death signal (SIGTERM, so
//! it still writes out its append-only file), so a `kill -9` or an OOM kill of `engram up`
//! leaves no Redis behind. And if one is left behind anyway (started by an older engram, or
//! still shutting down when the next `engram up` starts), a Redis on the port that serves this
//! same directory (`CONFIG GET dir`) is shut down cleanly and replaced; a Redis that belongs
//! to anything else is refused.

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
        // Redis changes into `--dir` before it opens `--logfile`: both must be absolute.
        let dir = std::path::absolute(dir)
            .map_err(|e| Error::unavailable(format!("cannot resolve {}: {e}", dir.display())))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::unavailable(format!("cannot create {}: {e}", dir.display())))?;
        let port = match port {
            Some(port) => port,
            None => free_port()?,
        };
        let mut this = Self {
            child: None,
            port,
            dir,
            persistence,
        };
        this.spawn().await?;
        Ok(this)
    }

    async fn spawn(&mut self) -> Result<()> {
        self.take_over_port().await?;
        let (appendonly, fsync) = match self.persistence {
            Persistence::None => ("no", "everysec"),
            Persistence::AppendOnly => ("yes", "everysec"),
            Persistence::AppendOnlyAlways => ("yes", "always"),
        };
        let mut command = Command::new("redis-server");
        die_with_parent(&mut command);
        let child = command
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

    /// Make sure the port is free: nothing there, or a Redis serving this same directory (left
    /// behind by a crashed `engram up`, or still shutting down), which is shut down cleanly.
    async fn take_over_port(&self) -> Result<()> {
        let in_use = || {
            Error::unavailable(format!(
                "port {} is already in use; choose another Redis port or set ENGRAM_REDIS_URL to use that Redis",
                self.port
            ))
        };
        let ours = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let started = tokio::time::Instant::now();
        let mut announced = false;
        loop {
            let Ok(mut stream) = tokio::net::TcpStream::connect(self.addr()).await else {
                return Ok(());
            };
            match command(&mut stream, &["CONFIG", "GET", "dir"]).await {
                Ok(Reply::Array(fields)) if fields.len() == 2 => {
                    if Path::new(&fields[1]) != ours {
                        return Err(in_use());
                    }
                    if !announced {
                        eprintln!(
                            "engram: taking over the Redis left running on port {} for {}",
                            self.port,
                            self.dir.display()
                        );
                        announced = true;
                    }
                    // Redis answers SHUTDOWN by closing the connection once its files are written.
                    let _ = command(&mut stream, &["SHUTDOWN"]).await;
                }
                // Not a Redis, or one that wants a password: not ours.
                Ok(_) => return Err(in_use()),
                // The connection closed before a reply: a Redis on its way down.
                Err(_) => {}
            }
            if started.elapsed() > STARTUP {
                return Err(Error::unavailable(format!(
                    "the Redis left running on port {} for {} did not stop within {STARTUP:?}",
                    self.port,
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
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

/// Have the kernel send the child SIGTERM when this thread's process dies, however it dies.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the closure runs in the forked child before exec and only makes two
        // async-signal-safe system calls (prctl, getppid) and, at worst, _exit; it allocates
        // nothing and touches no lock.
        let parent = std::process::id();
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody will signal.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// A Redis reply, as far as this module needs to read one.
#[derive(Debug)]
enum Reply {
    Simple(String),
    Error,
    Array(Vec<String>),
}

/// Send one command and read its reply (simple strings, errors and arrays of bulk strings).
async fn command(stream: &mut tokio::net::TcpStream, args: &[&str]) -> std::io::Result<Reply> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).await?;
    let mut reader = tokio::io::BufReader::new(stream);
    let read = async {
        let line = read_line(&mut reader).await?;
        let (kind, rest) = line.split_at(line.len().min(1));
        match kind {
            "+" => Ok(Reply::Simple(rest.to_string())),
            "-" => Ok(Reply::Error),
            "*" => {
                let count: usize = rest.parse().map_err(|_| bad_reply())?;
                let mut items = Vec::with_capacity(count.min(16));
                for _ in 0..count.min(16) {
                    let header = read_line(&mut reader).await?;
                    let len: usize = header
                        .strip_prefix('$')
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n <= 64 * 1024)
                        .ok_or_else(bad_reply)?;
                    let mut value = vec![0u8; len + 2];
                    reader.read_exact(&mut value).await?;
                    value.truncate(len);
                    items.push(String::from_utf8_lossy(&value).into_owned());
                }
                Ok(Reply::Array(items))
            }
            _ => Err(bad_reply()),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))?
}

/// One CRLF-terminated line, without the CRLF, at most 64 KiB.
async fn read_line(
    reader: &mut tokio::io::BufReader<&mut tokio::net::TcpStream>,
) -> std::io::Result<String> {
    use tokio::io::AsyncBufReadExt as _;
    let mut line = Vec::new();
    let read = (&mut *reader)
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = String::from_utf8_lossy(&line);
    line.strip_suffix("\r\n")
        .map(str::to_string)
        .ok_or_else(bad_reply)
}

fn bad_reply() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "not a Redis reply")
}

async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    matches!(command(&mut stream, &["PING"]).await, Ok(Reply::Simple(pong)) if pong == "PONG")
}
