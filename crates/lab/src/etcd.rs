//! The zone's consensus store: one etcd member per host of the zone's `[consensus]` placement
//! (by default the database sites' hosts; the reference zone adds a second in DC2.1 and one
//! at the witness), in that host's namespace, talking across the APN emulator like
//! everything else.
//!
//! Every member serves its clients and its peers over TLS only, with its host's consensus
//! certificate of the zone PKI, and requires from each of them a certificate of the zone CA
//! that names the consensus store ([`dczone_pki::CONSENSUS_NAME`]): a guest, which holds no
//! certificate, and a host or an operator, whose certificates open the agents, cannot read
//! or write a key. Only the etcd members and the HA agents hold consensus certificates (and,
//! in the lab, the `db` and `bench` commands, which do not go through the agents yet).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dczone_pki::tls::{self, Identity};
use dczone_pki::{Pki, Role};
use dczone_zone::Zone;
use serde::Serialize;

use crate::{sys, Lab, LabError};

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// One etcd member of the lab.
#[derive(Debug, Clone, Serialize)]
pub struct EtcdMember {
    pub name: String,
    pub site: String,
    pub host: String,
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

    fn etcd_pid_file(&self, m: &EtcdMember) -> PathBuf {
        self.dir().join("etcd").join(format!("{}.pid", m.name))
    }

    fn membership_file(&self) -> PathBuf {
        self.dir().join("etcd").join("membership.json")
    }

    /// The names of the members in the cluster, if it was rebuilt on survivors (`None`: the
    /// zone's placement, as first started).
    pub fn etcd_membership(&self) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(self.membership_file()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn set_etcd_membership(&self, names: &[String]) -> Result<(), LabError> {
        let path = self.membership_file();
        std::fs::write(&path, serde_json::to_vec(names).expect("names serialize")).map_err(
            |source| LabError::Io {
                what: format!("write {}", path.display()),
                source,
            },
        )
    }

    fn etcd_pid(&self, m: &EtcdMember) -> Option<i32> {
        std::fs::read_to_string(self.etcd_pid_file(m))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|&p| sys::alive(p))
    }

    fn etcd_stop(&self, m: &EtcdMember) {
        if let Some(pid) = self.etcd_pid(m) {
            sys::kill(pid, libc::SIGKILL);
            let t = Instant::now();
            while sys::alive(pid) && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts one member. `cluster` lists the members it starts with; `state` is etcd's
    /// `--initial-cluster-state` (both are ignored once the data directory exists).
    fn etcd_start(
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
        let data = self.dir().join("etcd").join(&m.name);
        std::fs::create_dir_all(&data).map_err(io(format!("create {}", data.display())))?;
        let peer = m.peer_url();
        let client = m.client_url();
        let data_arg = data.display().to_string();
        let id = self.consensus_identity(&m.host, Some(m.ip))?;
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
            self.name(),
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
        let log = self.dir().join("etcd").join(format!("{}.log", m.name));
        let pid = self.spawn_daemon(&m.namespace, &binary, &args, &log, "etcd")?;
        let pid_file = self.etcd_pid_file(m);
        std::fs::write(&pid_file, pid.to_string())
            .map_err(io(format!("write {}", pid_file.display())))
    }

    fn etcd_wait_healthy(&self, m: &EtcdMember, within: Duration) -> Result<(), LabError> {
        let id = self.consensus_identity(&m.host, Some(m.ip))?;
        let tls = tls::client_config(&id.ca, Some(&id))?;
        let deadline = Instant::now() + within;
        while !healthy(m, tls.clone()) {
            if Instant::now() > deadline {
                return Err(LabError::BadValue {
                    field: format!("etcd member {}", m.name),
                    reason: format!(
                        "not healthy after {} s; see {}",
                        within.as_secs(),
                        self.dir()
                            .join("etcd")
                            .join(format!("{}.log", m.name))
                            .display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The members that make up the cluster now: after a rebuild on survivors
    /// (`etcd_force_new_cluster`) only those, else the zone's placement.
    fn etcd_current<'a>(&self, members: &'a [EtcdMember]) -> Vec<&'a EtcdMember> {
        match self.etcd_membership() {
            Some(names) => members.iter().filter(|m| names.contains(&m.name)).collect(),
            None => members.iter().collect(),
        }
    }

    /// Starts `host`'s members of the cluster that are not running (idempotent), without
    /// waiting for them: a new cluster answers only once a majority runs. Its host's agent
    /// calls this (`POST /v1/etcd`). Members out of the cluster after a rebuild rejoin
    /// through `etcd_rejoin` instead. Returns the names of those it started.
    pub fn etcd_start_host(&self, zone: &Zone, host: &str) -> Result<Vec<String>, LabError> {
        let members = self.etcd_members(zone);
        let current = self.etcd_current(&members);
        let mut started = Vec::new();
        for m in current.iter().filter(|m| m.host == host) {
            if self.etcd_pid(m).is_none() {
                self.etcd_start(m, &current, "new", &[])?;
                started.push(m.name.clone());
            }
        }
        Ok(started)
    }

    /// Waits until every member of the cluster answers, but those whose site is isolated.
    pub fn etcd_wait_up(&self, zone: &Zone) -> Result<(), LabError> {
        let members = self.etcd_members(zone);
        let isolated = self.state().map(|s| s.isolated).unwrap_or_default();
        for m in self
            .etcd_current(&members)
            .iter()
            .filter(|m| !isolated.contains(&m.site))
        {
            self.etcd_wait_healthy(m, Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// Disaster recovery of the consensus store (etcd's documented procedure): restarts the
    /// surviving member `keep` with `--force-new-cluster`, which keeps its data and makes it
    /// a cluster of one. The other members are out of the cluster until `etcd_rejoin`; a
    /// cut-off member that still runs keeps the old cluster's identity and can never form a
    /// majority with it again.
    pub fn etcd_force_new_cluster(&self, zone: &Zone, keep: &str) -> Result<(), LabError> {
        let members = self.etcd_members(zone);
        let m = members
            .iter()
            .find(|m| m.name == keep)
            .ok_or_else(|| LabError::BadValue {
                field: "etcd member".into(),
                reason: format!("no member named '{keep}'"),
            })?;
        self.etcd_stop(m);
        // Only this start carries --force-new-cluster; `etcd_start_host` restarts it plainly.
        self.etcd_start(m, &[m], "new", &["--force-new-cluster"])?;
        self.set_etcd_membership(std::slice::from_ref(&m.name))?;
        self.etcd_wait_healthy(m, Duration::from_secs(30))
    }

    /// The zone's members that are not in the cluster (after a rebuild), in zone order.
    pub fn etcd_missing(&self, zone: &Zone) -> Vec<EtcdMember> {
        let Some(names) = self.etcd_membership() else {
            return Vec::new();
        };
        self.etcd_members(zone)
            .into_iter()
            .filter(|m| !names.contains(&m.name))
            .collect()
    }

    /// Starts `name` afresh as a new member of the running cluster, once the caller has
    /// added it (etcd's `member add`): its old data (another cluster's) is removed.
    pub fn etcd_rejoin(&self, zone: &Zone, name: &str) -> Result<(), LabError> {
        let members = self.etcd_members(zone);
        let mut names = self.etcd_membership().unwrap_or_default();
        let m = members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| LabError::BadValue {
                field: "etcd member".into(),
                reason: format!("no member named '{name}'"),
            })?;
        self.etcd_stop(m);
        let data = self.dir().join("etcd").join(&m.name);
        let _ = std::fs::remove_dir_all(&data);
        names.push(m.name.clone());
        let cluster: Vec<&EtcdMember> =
            members.iter().filter(|x| names.contains(&x.name)).collect();
        self.etcd_start(m, &cluster, "existing", &[])?;
        self.etcd_wait_healthy(m, Duration::from_secs(30))?;
        if names.len() == members.len() {
            // Whole again: back to the zone's placement.
            let _ = std::fs::remove_file(self.membership_file());
            Ok(())
        } else {
            self.set_etcd_membership(&names)
        }
    }

    /// Kills every etcd member of one site (a fault to inject); `db up` restarts them.
    pub fn etcd_kill(&self, zone: &Zone, site: &str) -> Result<(), LabError> {
        let members = self.etcd_members(zone);
        let mine: Vec<&EtcdMember> = members.iter().filter(|m| m.site == site).collect();
        if mine.is_empty() {
            let mut known: Vec<String> = members.iter().map(|m| m.site.clone()).collect();
            known.dedup();
            return Err(LabError::UnknownSite {
                site: site.into(),
                known: known.join(", "),
            });
        }
        for m in mine {
            if let Some(pid) = std::fs::read_to_string(self.etcd_pid_file(m))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                sys::kill(pid, libc::SIGKILL);
            }
        }
        Ok(())
    }
}
