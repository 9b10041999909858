//! The operator's side of the control plane. [`ZoneAgents`] is one interface over a zone's
//! host agents, with two implementations: [`Access`] (an access bundle: real hosts, or a
//! lab driven from outside) and [`LabAgents`] (the lab's, started on demand).
//!
//! The lab's host agents: `dczoned` is started on demand in a host's
//! namespace (one per host, with a host certificate of the lab's zone CA), and every call
//! is made over mutual TLS with the operator's certificate from a thread inside that
//! namespace, where the host's lab address is reachable. On real hosts the agents run as
//! services and the same calls go over the network.
//!
//! The lab's PKI is created on first use: `<lab>/pki` (the zone CA, and each host's
//! certificate, issued when its agent first starts) and the access bundle `<lab>/access`
//! (`ca.crt`, `operator.crt`, `operator.key`).

pub mod backup;
pub mod cloud;
pub mod vms;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde_json::Value;

use dczone_agent::access::{Access, Bundle, BundleDatabase, BundleHost, BundleMember};
use dczone_agent::{AgentClient, CallError, AGENT_PORT};
use dczone_lab::{sys, Lab};
use dczone_pki::tls::{self, ClientConfig, Identity};
use dczone_pki::{Pki, Role};

#[derive(Debug)]
pub struct HostAgents {
    pub lab: Lab,
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
            static TMP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = TMP.fetch_add(1, Ordering::SeqCst);
            let tmp = access.with_extension(format!("{}-{n}", std::process::id()));
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

    /// Starts the agent of every host of the zone (clients excepted), all at once, and
    /// writes the operator's access bundle with every agent's endpoint
    /// (`<lab>/access/zone.toml`, see [`dczone_agent::access`]). Returns the bundle's
    /// directory.
    pub fn start_all(&self) -> anyhow::Result<PathBuf> {
        // The guest image and the accelerator probe first, once, rather than by every
        // agent at once.
        platform(&self.lab, &self.daemon)?;
        self.ensure_all()
    }

    /// [`HostAgents::start_all`] without the image and accelerator checks: every agent runs
    /// (a health call each when they do) and the bundle is written.
    pub fn ensure_all(&self) -> anyhow::Result<PathBuf> {
        let zone = self.lab.state()?.zone()?;
        let hosts: Vec<_> = zone
            .hosts()
            .into_iter()
            .filter(|h| !h.id.ends_with("-client"))
            .collect();
        std::thread::scope(|s| {
            let started: Vec<_> = hosts
                .iter()
                .map(|h| s.spawn(move || self.ensure(&h.id).map(|_| ())))
                .collect();
            started
                .into_iter()
                .map(|t| t.join().map_err(|_| anyhow!("an agent start panicked"))?)
                .collect::<anyhow::Result<Vec<()>>>()
        })?;
        let bundle = Bundle {
            zone: zone.name.clone(),
            hosts: hosts
                .iter()
                .map(|h| BundleHost {
                    id: h.id.clone(),
                    site: zone.sites[h.site].id.clone(),
                    agent: format!("https://{}:{AGENT_PORT}", h.ip()),
                })
                .collect(),
            database: zone.database.as_ref().map(|plan| BundleDatabase {
                tier: plan.tier.clone(),
                replication: Some(plan.policy().replication),
                members: plan
                    .members()
                    .iter()
                    .filter_map(|site| {
                        let idx = zone.site_index(site)?;
                        let host = zone.sites[idx].hosts.get(plan.host_index)?;
                        let ip = zone.host(host)?.ip();
                        Some(BundleMember {
                            site: site.clone(),
                            host: host.clone(),
                            address: ip,
                        })
                    })
                    .collect(),
                consensus: zone
                    .consensus
                    .as_ref()
                    .map(|c| c.hosts.clone())
                    .unwrap_or_default(),
                witness: zone
                    .sites
                    .iter()
                    .find(|s| s.kind == dczone_zone::SiteKind::Witness)
                    .map(|s| s.id.clone()),
                clients: Vec::new(),
                app_networks: (0..zone.sites.len())
                    .map(dczone_zone::lab_site_network)
                    .collect(),
                plan: Some(plan.clone()),
            }),
        };
        let dir = self.access_dir();
        bundle.write(&dir)?;
        Ok(dir)
    }

    /// Migrates every VM of `group` to `to_site` through the agents, as an operator with the
    /// access bundle would ([`Access::migrate_group`]): every agent is made sure to run,
    /// and the coordinator runs in the zone's first client host's namespace (`dc1.1-client`
    /// in the reference zone), where the agents' addresses are reachable. `progress` is
    /// called on this thread.
    pub fn migrate_group(
        &self,
        group: &str,
        to_site: &str,
        strategy: dczone_virt::migrate::Strategy,
        params: &dczone_virt::migrate::Params,
        progress: &dyn Fn(&[dczone_virt::migrate::Progress]),
    ) -> anyhow::Result<dczone_virt::migrate::GroupMigration> {
        // Not start_all: its accelerator probe and image check take seconds of CPU that the
        // guests under load need (measured: a 9-11 s service gap before the first move).
        let dir = self.ensure_all()?;
        let ns = self.client_namespace()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (group, to_site, params) = (group.to_string(), to_site.to_string(), *params);
        let coordinator = sys::in_namespace(&ns, move || -> anyhow::Result<_> {
            let access = Access::open(&dir)?;
            Ok(
                access.migrate_group(&group, &to_site, strategy, &params, &|p| {
                    let _ = tx.send(p.to_vec());
                })?,
            )
        })?;
        for p in rx {
            progress(&p);
        }
        coordinator
            .join()
            .map_err(|_| anyhow!("the migration's coordinator panicked"))?
    }

    /// The namespace of the zone's first client host (`dc1.1-client` in the reference
    /// zone), from where an operator reaches every agent's address.
    fn client_namespace(&self) -> anyhow::Result<String> {
        let zone = self.lab.state()?.zone()?;
        let client = zone
            .hosts()
            .into_iter()
            .find(|h| h.id.ends_with("-client"))
            .ok_or_else(|| anyhow!("the zone has no client host to reach the agents from"))?;
        Ok(self.lab.host(&client.id)?.1)
    }

    /// Runs `f` with the lab's access bundle from the zone's first client host, as an
    /// operator would; every agent is made sure to run first.
    pub fn as_operator<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Access) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let dir = self.ensure_all()?;
        let ns = self.client_namespace()?;
        sys::in_namespace(&ns, move || -> anyhow::Result<T> {
            Ok(f(&Access::open(&dir)?))
        })?
        .join()
        .map_err(|_| anyhow!("the operator's thread panicked"))?
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
            .map_err(call_error)
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
            poll(&client, &path, &stop, f)
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

/// An agent's refusal is its own explanation; anything else says which agent failed.
fn call_error(e: CallError) -> anyhow::Error {
    match e {
        CallError::Refused { message, .. } => anyhow!("{message}"),
        e => anyhow!("{e}"),
    }
}

/// Polls `path` every 200 ms, handing each answer to `f`, until `stop` is set.
fn poll(client: &AgentClient, path: &str, stop: &AtomicBool, f: impl Fn(Value)) {
    while !stop.load(Ordering::SeqCst) {
        if let Ok(v) = client.call("GET", path, None, Duration::from_millis(500)) {
            f(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The zone's host agents as the VM commands use them: the lab's (entered through each
/// host's namespace, started on demand), or a remote zone's through an access bundle.
pub trait ZoneAgents {
    /// Calls `host`'s agent.
    fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value>;
    /// Polls `path` on `host`'s agent every 200 ms, handing each answer to `f`, until
    /// `stop` is set.
    fn watch(
        &self,
        host: &str,
        path: &str,
        stop: Arc<AtomicBool>,
        f: Box<dyn Fn(Value) + Send>,
    ) -> anyhow::Result<JoinHandle<()>>;
    /// The host VM `name` is on.
    fn host_of(&self, name: &str) -> anyhow::Result<String>;
    /// Every VM of the zone.
    fn list(&self) -> anyhow::Result<Vec<dczone_virt::VmRecord>>;
    /// Fails unless `host` is a host of the zone.
    fn check_host(&self, host: &str) -> anyhow::Result<()>;
    /// `host`'s agent endpoint, when the agents cannot work it out themselves.
    fn agent_url(&self, host: &str) -> Option<String>;
}

/// The lab's agents: VMs are found by asking them all, from the zone's client host with
/// the lab's access bundle, as with [`Access`].
#[derive(Debug)]
pub struct LabAgents {
    pub agents: HostAgents,
}

impl LabAgents {
    /// Every agent's VMs, asked from the client host as an operator would; an agent that
    /// host cannot reach (its site cut off) is asked from inside its own host. Also the
    /// hosts whose agents did not answer either way.
    fn list_all(&self) -> anyhow::Result<(Vec<dczone_agent::access::Found>, Vec<String>)> {
        let (mut vms, cut_off) = self.agents.as_operator(|a| a.list())?;
        let mut unreachable = Vec::new();
        for host in cut_off {
            match self
                .agents
                .call(&host, "GET", "/v1/vms", None, Duration::from_secs(5))
                .and_then(|v| Ok(serde_json::from_value::<Vec<dczone_virt::VmRecord>>(v)?))
            {
                Ok(list) => vms.extend(list.into_iter().map(|v| (host.clone(), v))),
                Err(_) => unreachable.push(host),
            }
        }
        vms.sort_by(|a, b| a.1.spec.name.cmp(&b.1.spec.name));
        Ok((vms, unreachable))
    }
}

impl ZoneAgents for LabAgents {
    fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.agents.call(host, method, path, body, timeout)
    }
    fn watch(
        &self,
        host: &str,
        path: &str,
        stop: Arc<AtomicBool>,
        f: Box<dyn Fn(Value) + Send>,
    ) -> anyhow::Result<JoinHandle<()>> {
        self.agents.watch(host, path, stop, f)
    }
    fn host_of(&self, name: &str) -> anyhow::Result<String> {
        let (vms, unreachable) = self.list_all()?;
        match vms.into_iter().find(|(_, v)| v.spec.name == name) {
            Some((host, _)) => Ok(host),
            None => Err(dczone_agent::access::AccessError::UnknownVm {
                vm: name.into(),
                unreachable,
            }
            .into()),
        }
    }
    fn list(&self) -> anyhow::Result<Vec<dczone_virt::VmRecord>> {
        let (vms, unreachable) = self.list_all()?;
        Ok(records(vms, &unreachable))
    }
    fn check_host(&self, host: &str) -> anyhow::Result<()> {
        self.agents.lab.host(host)?;
        Ok(())
    }
    fn agent_url(&self, _host: &str) -> Option<String> {
        None
    }
}

/// The storage commands reach the lab's agents from inside each host.
impl dczone_storage::operator::Agents for LabAgents {
    fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.agents.call(host, method, path, body, timeout)
    }
}

/// The records of a listing, with a warning naming the agents that did not answer.
fn records(
    vms: Vec<dczone_agent::access::Found>,
    unreachable: &[String],
) -> Vec<dczone_virt::VmRecord> {
    if !unreachable.is_empty() {
        eprintln!(
            "warning: the agents of {} did not answer; their VMs are not listed",
            unreachable.join(", ")
        );
    }
    vms.into_iter().map(|(_, v)| v).collect()
}

impl ZoneAgents for Access {
    fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.client(host)?
            .call(method, path, body, timeout)
            .map_err(call_error)
    }
    fn watch(
        &self,
        host: &str,
        path: &str,
        stop: Arc<AtomicBool>,
        f: Box<dyn Fn(Value) + Send>,
    ) -> anyhow::Result<JoinHandle<()>> {
        let client = self.client(host)?;
        let path = path.to_string();
        Ok(std::thread::spawn(move || poll(&client, &path, &stop, f)))
    }
    fn host_of(&self, name: &str) -> anyhow::Result<String> {
        Ok(self.find(name)?.0)
    }
    fn list(&self) -> anyhow::Result<Vec<dczone_virt::VmRecord>> {
        let (vms, unreachable) = Access::list(self);
        Ok(records(vms, &unreachable))
    }
    fn check_host(&self, host: &str) -> anyhow::Result<()> {
        Access::agent_url(self, host)?;
        Ok(())
    }
    fn agent_url(&self, host: &str) -> Option<String> {
        Access::agent_url(self, host).ok().map(str::to_string)
    }
}

/// `db up`: makes sure every host's agent runs (each starts its host's HA agents), then
/// brings the database platform up ([`Database::up_within`]); returns the primary's site.
pub fn db_up(
    p: &dczone_database::Database,
    exe: &Path,
    state_dir: &Path,
    client: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    HostAgents::new(&p.lab, exe, state_dir)?.ensure_all()?;
    p.up_within(client, timeout)
}

/// Stops the platform's HA agents through the hosts' agents (started first, should one be
/// gone) and clears its state in etcd (whose members they start, should one be gone).
pub fn db_down(
    p: &dczone_database::Database,
    exe: &Path,
    state_dir: &Path,
) -> anyhow::Result<dczone_database::recovery::Down> {
    HostAgents::new(&p.lab, exe, state_dir)?.ensure_all()?;
    p.etcd_up()?;
    p.down()
}

/// `db failover`: every host's agent is made sure to run first (each from inside its
/// host, so a cut-off site's too), so that fencing cannot stop half-way for want of one.
pub fn db_failover(
    p: &dczone_database::Database,
    exe: &Path,
    state_dir: &Path,
    to: &str,
    accept_data_loss: bool,
    timeout: Duration,
) -> anyhow::Result<dczone_database::FailoverReport> {
    HostAgents::new(&p.lab, exe, state_dir)?.ensure_all()?;
    p.failover(to, accept_data_loss, timeout)
}

/// The lab's VM platform: the guest image built for `exe` (`dczone` or `dczoned`, the
/// image's inputs are found beside it) and the accelerator probed.
pub fn platform(lab: &Lab, exe: &Path) -> anyhow::Result<dczone_virt::Platform> {
    Ok(dczone_virt::Platform::open(
        lab.clone(),
        &dczone_image::ImageInputs::for_executable(exe),
    )?)
}

/// The lab's agents: the guest image is built (and the accelerator probed) before an agent
/// needs it.
pub fn lab_agents(lab: &Lab, exe: &Path, state_dir: &Path) -> anyhow::Result<LabAgents> {
    platform(lab, exe)?;
    Ok(LabAgents {
        agents: HostAgents::new(lab, exe, state_dir)?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agents_port_takes_the_emulators_priority_class() {
        assert_eq!(dczone_agent::AGENT_PORT, dczone_apn::control::AGENT_PORT);
        assert!(dczone_apn::control::default_priority_ports().contains(&dczone_agent::AGENT_PORT));
        // Backup chunks travel in the bulk class, not with the agents' control calls.
        let bulk = dczone_agent::bulk_port(dczone_agent::AGENT_PORT);
        assert_eq!(bulk, dczone_apn::control::AGENT_BULK_PORT);
        assert!(dczone_apn::control::default_bulk_ports().contains(&bulk));
        assert!(!dczone_apn::control::default_priority_ports().contains(&bulk));
        assert_eq!(
            dczone_agent::bulk_url("https://10.77.3.11:7070").unwrap(),
            "https://10.77.3.11:7071"
        );
        assert!(dczone_agent::bulk_url("https://10.77.3.11").is_err());
    }
}
