//! The zone's consensus store: one etcd member per host of the zone's `[consensus]` placement
//! (by default the database sites' hosts; the reference zone adds a second in DC2.1 and one
//! at the witness), in that host's namespace, talking across the APN emulator like
//! everything else. [`EtcdCluster`] manages the members (start, rebuild on a survivor,
//! rejoin) for a lab's hosts and, with [`Placement::Host`], for a real host's agent.
//!
//! Every member serves its clients and its peers over TLS only, with its host's consensus
//! certificate of the zone PKI, and requires from each of them a certificate of the zone CA
//! that names the consensus store ([`dczone_pki::CONSENSUS_NAME`]): a guest, which holds no
//! certificate, and a host or an operator, whose certificates open the agents, cannot read
//! or write a key. Only the etcd members, the HA agents and, for a manual failover's
//! rebuild, their hosts' agents hold consensus certificates (the region benchmark's
//! placement cost measures etcd's calls as the primary's HA agent makes them, with its
//! host's).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dczone_pki::tls::{self, Identity};
use dczone_pki::{Pki, Role};
use dczone_zone::Zone;
use serde::Serialize;

use crate::{spawn_detached, sys, Lab, LabError};

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// One etcd member of the zone.
#[derive(Debug, Clone, Serialize)]
pub struct EtcdMember {
    pub name: String,
    pub site: String,
    pub host: String,
    /// The network namespace it runs in: its host's in a lab, empty on a real host (the
    /// agent's own).
    pub namespace: String,
    pub ip: Ipv4Addr,
}

impl EtcdMember {
    pub fn client_url(&self) -> String {
        format!("https://{}:{CLIENT_PORT}", self.ip)
    }

    pub fn peer_url(&self) -> String {
        format!("https://{}:{PEER_PORT}", self.ip)
    }
}

/// The client URLs of the members in the sites `at` accepts, in `members`' order: an HA
/// agent's own site's, or the witness's.
pub fn client_urls(members: &[EtcdMember], at: impl Fn(&str) -> bool) -> Vec<String> {
    members
        .iter()
        .filter(|m| at(&m.site))
        .map(|m| m.client_url())
        .collect()
}

/// The `etcd` binary (Debian's etcd-server), or a message saying how to get it.
fn etcd_binary() -> Result<PathBuf, LabError> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(LabError::BadValue {
        field: "etcd".into(),
        reason: "the etcd binary is not installed; run `apt-get install etcd-server` (or \
                 scripts/deps)"
            .into(),
    })
}

pub fn installed() -> bool {
    etcd_binary().is_ok()
}

/// The etcd processes whose `--data-dir` is `data`.
fn processes_serving(data: &Path) -> Vec<i32> {
    let want = data.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"etcd"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--data-dir" && w[1] == want)
        })
        .collect()
}

/// Asks a member's /health from inside its namespace, over TLS with `tls` (a client
/// certificate of the zone).
fn healthy(member: &EtcdMember, tls: Arc<tls::ClientConfig>) -> bool {
    let addr = SocketAddr::from((member.ip, CLIENT_PORT));
    let ip = member.ip;
    let probe = move || -> bool {
        let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_millis(1500)));
        let name = rustls::pki_types::ServerName::IpAddress(IpAddr::V4(ip).into());
        let Ok(conn) = rustls::ClientConnection::new(tls, name) else {
            return false;
        };
        let mut s = rustls::StreamOwned::new(conn, tcp);
        if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    };
    if member.namespace.is_empty() {
        return probe();
    }
    match sys::in_namespace(&member.namespace, probe) {
        Ok(h) => h.join().unwrap_or(false),
        Err(_) => false,
    }
}

impl Lab {
    /// The lab's zone PKI (the host agents' too; created on first use).
    pub fn pki_dir(&self) -> PathBuf {
        self.dir().join("pki")
    }

    /// The consensus certificate of `name` (a host, for `ip`) in the zone PKI, issued on
    /// first use. An etcd member serves with its host's; the HA agent on a host shows its
    /// host's to etcd.
    pub fn consensus_identity(
        &self,
        name: &str,
        ip: Option<Ipv4Addr>,
    ) -> Result<Identity, LabError> {
        let pki = Pki::open_or_init(&self.pki_dir(), self.name())?;
        let ips: Vec<IpAddr> = ip.into_iter().map(IpAddr::V4).collect();
        let (certificate, key) = pki.ensure(Role::Consensus, name, &ips, 825)?;
        Ok(Identity {
            ca: pki.ca_cert(),
            certificate,
            key,
        })
    }

    /// The etcd members of `zone`: one per host of its consensus placement (none if it has
    /// no database). A member is named after its host.
    pub fn etcd_members(&self, zone: &Zone) -> Vec<EtcdMember> {
        let Some(plan) = &zone.consensus else {
            return Vec::new();
        };
        plan.hosts
            .iter()
            .filter_map(|host| {
                let h = zone.host(host)?;
                Some(EtcdMember {
                    name: dczone_zone::database::app_name(host),
                    site: zone.sites[h.site].id.clone(),
                    namespace: self.host_namespace(host),
                    ip: h.ip(),
                    host: host.clone(),
                })
            })
            .collect()
    }

    /// The lab's etcd cluster: its members in their hosts' namespaces, with the lab's
    /// consensus certificates, their files in `<lab>/etcd`.
    pub fn etcd(&self, zone: &Zone) -> EtcdCluster {
        EtcdCluster {
            dir: self.dir().join("etcd"),
            token: self.name().to_string(),
            members: self.etcd_members(zone),
            place: Placement::Lab(self.clone()),
        }
    }

    /// The names of the members in the cluster, if it was rebuilt on survivors (`None`: the
    /// zone's placement, as first started).
    pub fn etcd_membership(&self) -> Option<Vec<String>> {
        membership(&self.dir().join("etcd"))
    }

    /// See [`EtcdCluster::start_host`].
    pub fn etcd_start_host(&self, zone: &Zone, host: &str) -> Result<Vec<String>, LabError> {
        self.etcd(zone).start_host(host)
    }

    /// Waits until every member of the cluster answers, but those whose site is isolated.
    pub fn etcd_wait_up(&self, zone: &Zone) -> Result<(), LabError> {
        let cluster = self.etcd(zone);
        let isolated = self.state().map(|s| s.isolated).unwrap_or_default();
        for m in cluster
            .current()
            .into_iter()
            .filter(|m| !isolated.contains(&m.site))
        {
            cluster.wait_healthy(m, Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// See [`EtcdCluster::force_new_cluster`].
    pub fn etcd_force_new_cluster(&self, zone: &Zone, keep: &str) -> Result<(), LabError> {
        self.etcd(zone).force_new_cluster(keep)
    }

    /// See [`EtcdCluster::missing`].
    pub fn etcd_missing(&self, zone: &Zone) -> Vec<EtcdMember> {
        self.etcd(zone).missing()
    }

    /// See [`EtcdCluster::rejoin`].
    pub fn etcd_rejoin(&self, zone: &Zone, name: &str) -> Result<(), LabError> {
        self.etcd(zone).rejoin(name)
    }

    /// Kills every etcd member of one site (a fault to inject); `db up` restarts them.
    pub fn etcd_kill(&self, zone: &Zone, site: &str) -> Result<(), LabError> {
        let cluster = self.etcd(zone);
        let mine: Vec<&EtcdMember> = cluster.members.iter().filter(|m| m.site == site).collect();
        if mine.is_empty() {
            let mut known: Vec<String> = cluster.members.iter().map(|m| m.site.clone()).collect();
            known.dedup();
            return Err(LabError::UnknownSite {
                site: site.into(),
                known: known.join(", "),
            });
        }
        for m in mine {
            if let Some(pid) = std::fs::read_to_string(cluster.pid_file(m))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                sys::kill(pid, libc::SIGKILL);
            }
        }
        Ok(())
    }
}

/// Where an etcd cluster's members run, and with which certificates.
#[derive(Debug, Clone)]
pub enum Placement {
    /// A lab's hosts: each member in its host's namespace, with the lab's consensus
    /// certificate for it.
    Lab(Lab),
    /// One real host, whose agent starts its own members in its own namespace with the
    /// consensus certificate installed on it (`dczone pki issue HOST --consensus`).
    Host { identity: Identity },
}

/// A zone's etcd cluster as one host (or the lab) manages its members: their data
/// directories, logs and pid files under `dir`, and `membership.json` after a rebuild.
#[derive(Debug, Clone)]
pub struct EtcdCluster {
    pub dir: PathBuf,
    /// `--initial-cluster-token`: the zone's (or the lab's) name.
    pub token: String,
    /// The zone's placement, in its order.
    pub members: Vec<EtcdMember>,
    pub place: Placement,
}

fn membership(dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("membership.json")).ok()?;
    serde_json::from_str(&text).ok()
}

impl EtcdCluster {
    /// The consensus certificate member `m` serves with (its host's), which its host's
    /// parties also show etcd as clients.
    pub fn identity(&self, m: &EtcdMember) -> Result<Identity, LabError> {
        match &self.place {
            Placement::Lab(lab) => lab.consensus_identity(&m.host, Some(m.ip)),
            Placement::Host { identity } => Ok(identity.clone()),
        }
    }

    fn pid_file(&self, m: &EtcdMember) -> PathBuf {
        self.dir.join(format!("{}.pid", m.name))
    }

    fn membership_file(&self) -> PathBuf {
        self.dir.join("membership.json")
    }

    /// The names of the members in the cluster, if it was rebuilt on survivors (`None`: the
    /// zone's placement, as first started).
    pub fn membership(&self) -> Option<Vec<String>> {
        membership(&self.dir)
    }

    fn set_membership(&self, names: &[String]) -> Result<(), LabError> {
        let path = self.membership_file();
        std::fs::write(&path, serde_json::to_vec(names).expect("names serialize")).map_err(
            |source| LabError::Io {
                what: format!("write {}", path.display()),
                source,
            },
        )
    }

    fn pid(&self, m: &EtcdMember) -> Option<i32> {
        std::fs::read_to_string(self.pid_file(m))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|&p| sys::alive(p))
    }

    /// Stops member `m`: its pid file's process, and any other etcd process serving its
    /// data directory (a pid file can be stale: a start that failed to bind overwrites it),
    /// each killed and waited for, so that the next start finds its ports free.
    fn stop(&self, m: &EtcdMember) {
        let data = self.dir.join(&m.name);
        let mut pids: Vec<i32> = self.pid(m).into_iter().collect();
        for p in processes_serving(&data) {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
        for &pid in &pids {
            sys::kill(pid, libc::SIGKILL);
        }
        let t = Instant::now();
        while pids.iter().any(|&p| sys::alive(p)) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts one member. `cluster` lists the members it starts with; `state` is etcd's
    /// `--initial-cluster-state` (both are ignored once the data directory exists).
    fn start(
        &self,
        m: &EtcdMember,
        cluster: &[&EtcdMember],
        state: &str,
        extra: &[&str],
    ) -> Result<(), LabError> {
        let binary = etcd_binary()?;
        let cluster: Vec<String> = cluster
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        let cluster = cluster.join(",");
        let io = |what: String| move |source| LabError::Io { what, source };
        let data = self.dir.join(&m.name);
        std::fs::create_dir_all(&data).map_err(io(format!("create {}", data.display())))?;
        let peer = m.peer_url();
        let client = m.client_url();
        let data_arg = data.display().to_string();
        let id = self.identity(m)?;
        let (ca, cert, key) = (
            id.ca.display().to_string(),
            id.certificate.display().to_string(),
            id.key.display().to_string(),
        );
        let mut args = vec![
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--trusted-ca-file",
            &ca,
            "--client-cert-auth",
            "--client-cert-allowed-hostname",
            dczone_pki::CONSENSUS_NAME,
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &key,
            "--peer-trusted-ca-file",
            &ca,
            "--peer-client-cert-auth",
            "--peer-cert-allowed-hostname",
            dczone_pki::CONSENSUS_NAME,
            "--name",
            &m.name,
            "--data-dir",
            &data_arg,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--initial-cluster",
            &cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            &self.token,
            // A member that was cut off must not disrupt the cluster when it returns.
            "--pre-vote",
            // Faster than the defaults (100/1000 ms): the longest lab RTT is 25 ms.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--log-level",
            "warn",
        ];
        args.extend_from_slice(extra);
        let log = self.dir.clone().join(format!("{}.log", m.name));
        let ns = (!m.namespace.is_empty()).then_some(m.namespace.as_str());
        let pid = spawn_detached(ns, &binary, &args, &log, "etcd")?;
        let pid_file = self.pid_file(m);
        std::fs::write(&pid_file, pid.to_string())
            .map_err(io(format!("write {}", pid_file.display())))
    }

    pub fn wait_healthy(&self, m: &EtcdMember, within: Duration) -> Result<(), LabError> {
        let id = self.identity(m)?;
        let tls = tls::client_config(&id.ca, Some(&id))?;
        let deadline = Instant::now() + within;
        while !healthy(m, tls.clone()) {
            if Instant::now() > deadline {
                return Err(LabError::BadValue {
                    field: format!("etcd member {}", m.name),
                    reason: format!(
                        "not healthy after {} s; see {}",
                        within.as_secs(),
                        self.dir.join(format!("{}.log", m.name)).display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The members that make up the cluster now: after a rebuild on survivors
    /// ([`EtcdCluster::force_new_cluster`]) only those, else the zone's placement.
    pub fn current(&self) -> Vec<&EtcdMember> {
        match self.membership() {
            Some(names) => self
                .members
                .iter()
                .filter(|m| names.contains(&m.name))
                .collect(),
            None => self.members.iter().collect(),
        }
    }

    /// Starts `host`'s members of the cluster that are not running (idempotent), without
    /// waiting for them: a new cluster answers only once a majority runs. Its host's agent
    /// calls this (`POST /v1/etcd`). Members out of the cluster after a rebuild rejoin
    /// through [`EtcdCluster::rejoin`] instead. Returns the names of those it started.
    pub fn start_host(&self, host: &str) -> Result<Vec<String>, LabError> {
        let current = self.current();
        let mut started = Vec::new();
        for m in current.iter().filter(|m| m.host == host) {
            if self.pid(m).is_none() {
                self.start(m, &current, "new", &[])?;
                started.push(m.name.clone());
            }
        }
        Ok(started)
    }

    /// Disaster recovery of the consensus store (etcd's documented procedure): restarts the
    /// surviving member `keep` with `--force-new-cluster`, which keeps its data and makes it
    /// a cluster of one. The other members are out of the cluster until
    /// [`EtcdCluster::rejoin`]. A cut-off member that still runs keeps the old cluster's
    /// identity: alone it never forms a majority again, but a majority of the old members
    /// cut off together form the old cluster again once they reach each other, until
    /// `rejoin` restarts them (see ARCHITECTURE.md, the manual failover).
    pub fn force_new_cluster(&self, keep: &str) -> Result<(), LabError> {
        let m = self
            .members
            .iter()
            .find(|m| m.name == keep)
            .ok_or_else(|| LabError::BadValue {
                field: "etcd member".into(),
                reason: format!("no member named '{keep}'"),
            })?;
        self.stop(m);
        // Only this start carries --force-new-cluster; `start_host` restarts it plainly.
        self.start(m, &[m], "new", &["--force-new-cluster"])?;
        self.set_membership(std::slice::from_ref(&m.name))?;
        self.wait_healthy(m, Duration::from_secs(30))
    }

    /// The zone's members that are not in the cluster (after a rebuild), in zone order.
    pub fn missing(&self) -> Vec<EtcdMember> {
        let Some(names) = self.membership() else {
            return Vec::new();
        };
        self.members
            .iter()
            .filter(|m| !names.contains(&m.name))
            .cloned()
            .collect()
    }

    /// Starts `name` afresh as a new member of the running cluster, once the caller has
    /// added it (etcd's `member add`): its old data (another cluster's) is removed.
    pub fn rejoin(&self, name: &str) -> Result<(), LabError> {
        let members = &self.members;
        let mut names = self.membership().unwrap_or_default();
        let m = members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| LabError::BadValue {
                field: "etcd member".into(),
                reason: format!("no member named '{name}'"),
            })?;
        self.stop(m);
        let data = self.dir.join(&m.name);
        let _ = std::fs::remove_dir_all(&data);
        names.push(m.name.clone());
        let cluster: Vec<&EtcdMember> =
            members.iter().filter(|x| names.contains(&x.name)).collect();
        self.start(m, &cluster, "existing", &[])?;
        self.wait_healthy(m, Duration::from_secs(30))?;
        if names.len() == members.len() {
            // Whole again: back to the zone's placement.
            let _ = std::fs::remove_file(self.membership_file());
            Ok(())
        } else {
            self.set_membership(&names)
        }
    }
}
