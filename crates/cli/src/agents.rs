//! The lab's host agents as the CLI sees them: `dczoned` is started on demand in a host's
//! namespace (one per host, with a host certificate of the lab's zone CA), and every call
//! is made over mutual TLS with the operator's certificate from a thread inside that
//! namespace, where the host's lab address is reachable. On real hosts the agents run as
//! services and the same calls go over the network.
//!
//! The lab's PKI is created on first use: `<lab>/pki` (the zone CA, and each host's
//! certificate, issued when its agent first starts) and the access bundle `<lab>/access`
//! (`ca.crt`, `operator.crt`, `operator.key`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde_json::Value;

use dczone_agent::{AgentClient, CallError, AGENT_PORT};
use dczone_lab::{sys, Lab};
use dczone_pki::tls::{self, ClientConfig, Identity};
use dczone_pki::{Pki, Role};

pub struct HostAgents {
    lab: Lab,
    daemon: PathBuf,
    state_dir: PathBuf,
    /// The operator's TLS configuration, read once.
    operator: OnceLock<Arc<ClientConfig>>,
}

/// Holds an exclusive lock on `path` while the file lives.
fn flock(path: &Path) -> anyhow::Result<std::fs::File> {
    let f = std::fs::File::create(path)?;
    // SAFETY: flock on a descriptor we own; released when the file is dropped.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    if rc != 0 {
        bail!(
            "lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(f)
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
            operator: OnceLock::new(),
        })
    }

    fn dir(&self) -> PathBuf {
        self.lab.dir().join("agents")
    }

    fn pki_dir(&self) -> PathBuf {
        self.lab.dir().join("pki")
    }

    /// The operator's access bundle: the zone CA certificate and the operator's
    /// certificate and key.
    pub fn access_dir(&self) -> PathBuf {
        self.lab.dir().join("access")
    }

    /// The lab's zone CA and access bundle, created on first use (two commands racing
    /// here share one CA), and `host`'s certificate for its address. Returns the
    /// operator's TLS client configuration.
    fn credentials(&self, host: &str, ip: std::net::IpAddr) -> anyhow::Result<Arc<ClientConfig>> {
        let pki = Pki::open_or_init(&self.pki_dir(), self.lab.name())?;
        let (op_cert, op_key) = pki.ensure(Role::Operator, "operator", &[], 825)?;
        let access = self.access_dir();
        if !access.exists() {
            // Made whole under a private name, then renamed into place: of two commands
            // racing here, one bundle wins and both use it.
            let tmp = access.with_extension(std::process::id().to_string());
            std::fs::create_dir_all(&tmp)?;
            std::fs::copy(pki.ca_cert(), tmp.join("ca.crt"))?;
            std::fs::copy(op_cert, tmp.join("operator.crt"))?;
            // std::fs::copy keeps the key's mode (0600).
            std::fs::copy(op_key, tmp.join("operator.key"))?;
            if std::fs::rename(&tmp, &access).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        pki.ensure(Role::Host, host, &[ip], 825)?;
        if let Some(c) = self.operator.get() {
            return Ok(c.clone());
        }
        let config =
            tls::client_config(&access.join("ca.crt"), Some(&Identity::operator(&access)))?;
        Ok(self.operator.get_or_init(|| config).clone())
    }

    /// Holds an exclusive lock on `host`'s agent slot while it lives.
    fn lock(&self, host: &str) -> anyhow::Result<std::fs::File> {
        std::fs::create_dir_all(self.dir())?;
        flock(&self.dir().join(format!("{host}.lock")))
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
        let tls = self.credentials(host, h.ip().into())?;
        let client = AgentClient::new(&format!("https://{}:{AGENT_PORT}", h.ip()), tls);
        let _slot = self.lock(host)?;
        let mut pid = self.pid(host);
        if pid.is_none() {
            let pki = self.pki_dir().display().to_string();
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
                    "--pki",
                    &pki,
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
