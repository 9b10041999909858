//! The lab's host agents as the CLI sees them: `dczoned` is started on demand in a host's
//! namespace (one per host, on the lab's shared token), and every call is made from a
//! thread inside that namespace, where the host's lab address is reachable. On real hosts
//! the agents run as services and the same calls go over the network.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

use dczone_agent::{AgentClient, CallError, AGENT_PORT};
use dczone_lab::{sys, Lab};

pub struct HostAgents {
    lab: Lab,
    daemon: PathBuf,
    state_dir: PathBuf,
}

impl HostAgents {
    /// `exe` is the running `dczone`; `dczoned` is expected beside it.
    pub fn new(lab: &Lab, exe: &Path, state_dir: &Path) -> anyhow::Result<HostAgents> {
        let daemon = exe.with_file_name("dczoned");
        if !daemon.exists() {
            bail!(
                "{} is missing; build it with `scripts/build` (cargo build --release --bin dczoned)",
                daemon.display()
            );
        }
        Ok(HostAgents {
            lab: lab.clone(),
            daemon,
            state_dir: state_dir.to_path_buf(),
        })
    }

    fn dir(&self) -> PathBuf {
        self.lab.dir().join("agents")
    }

    fn token_file(&self) -> PathBuf {
        self.dir().join("token")
    }

    /// The lab's bearer token, created (random, mode 0600) on first use.
    fn token(&self) -> anyhow::Result<String> {
        let path = self.token_file();
        if let Ok(t) = std::fs::read_to_string(&path) {
            if !t.trim().is_empty() {
                return Ok(t.trim().to_string());
            }
        }
        std::fs::create_dir_all(self.dir())?;
        let mut bytes = [0u8; 24];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // Written whole under a private name, then linked into place: of two commands
        // racing here, one token wins and both use it.
        let tmp = self.dir().join(format!("token.{}", std::process::id()));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("create {}", tmp.display()))?;
            std::io::Write::write_all(&mut f, token.as_bytes())?;
        }
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(token),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(std::fs::read_to_string(&path)?.trim().to_string())
            }
            Err(e) => Err(e).with_context(|| format!("create {}", path.display())),
        }
    }

    /// Holds an exclusive lock on `host`'s agent slot while it lives.
    fn lock(&self, host: &str) -> anyhow::Result<std::fs::File> {
        std::fs::create_dir_all(self.dir())?;
        let f = std::fs::File::create(self.dir().join(format!("{host}.lock")))?;
        // SAFETY: flock on a descriptor we own; released when the file is dropped.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        if rc != 0 {
            bail!(
                "lock the agent slot of {host}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(f)
    }

    fn pid(&self, host: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir().join(format!("{host}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .filter(|&p| {
                // A pid file that outlived its lab may name a reused pid. (Right after the
                // spawn the process may still be `ip netns exec ... dczoned`.)
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("dczoned"))
            })
    }

    /// Calls `host`'s agent, starting it first if it does not run.
    pub fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let client = self.ensure(host)?;
        let (method, path) = (method.to_string(), path.to_string());
        self.in_host(host, move || client.call(&method, &path, body, timeout))?
            .map_err(|e| match e {
                CallError::Refused { message, .. } => anyhow!("{message}"),
                e => anyhow!("{e}"),
            })
    }

    /// Polls `path` on `host`'s agent every 200 ms from a thread in its namespace, handing
    /// each answer to `f`, until `stop` is set.
    pub fn watch(
        &self,
        host: &str,
        path: &str,
        stop: Arc<AtomicBool>,
        f: impl Fn(Value) + Send + 'static,
    ) -> anyhow::Result<JoinHandle<()>> {
        let client = self.ensure(host)?;
        let (_, ns) = self.lab.host(host)?;
        let path = path.to_string();
        Ok(sys::in_namespace(&ns, move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(v) = client.call("GET", &path, None, Duration::from_millis(500)) {
                    f(v);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })?)
    }

    fn in_host<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let (_, ns) = self.lab.host(host)?;
        sys::in_namespace(&ns, f)?
            .join()
            .map_err(|_| anyhow!("the call to {host}'s agent panicked"))
    }

    /// Starts `host`'s agent unless it runs, and waits until it answers.
    fn ensure(&self, host: &str) -> anyhow::Result<AgentClient> {
        let (h, ns) = self.lab.host(host)?;
        let client = AgentClient::new(&format!("http://{}:{AGENT_PORT}", h.ip()), &self.token()?);
        let _slot = self.lock(host)?;
        let mut pid = self.pid(host);
        if pid.is_none() {
            let token_file = self.token_file().display().to_string();
            let state_dir = self.state_dir.display().to_string();
            let log = self.dir().join(format!("{host}.log"));
            let spawned = self.lab.spawn_daemon(
                &ns,
                &self.daemon,
                &[
                    "--lab",
                    self.lab.name(),
                    "--state-dir",
                    &state_dir,
                    "--host",
                    host,
                    "--token-file",
                    &token_file,
                ],
                &log,
                "the host agent",
            )?;
            std::fs::write(self.dir().join(format!("{host}.pid")), spawned.to_string())?;
            pid = Some(spawned);
        }
        let t = Instant::now();
        loop {
            let c = client.clone();
            let up = self.in_host(host, move || {
                c.call("GET", "/v1/health", None, Duration::from_millis(500))
                    .is_ok()
            })?;
            if up {
                return Ok(client);
            }
            // Liveness by pid alone: during `ip netns exec`'s execve the process's cmdline
            // reads empty for a moment, so the cmdline test of `pid()` would misfire here.
            let alive = pid.is_some_and(sys::alive);
            if !alive || t.elapsed() > Duration::from_secs(60) {
                let log = std::fs::read_to_string(self.dir().join(format!("{host}.log")))
                    .unwrap_or_default();
                bail!(
                    "the host agent of {host} did not come up: {}",
                    log.lines().last().unwrap_or("no output")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
