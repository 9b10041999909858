//! The zone's consensus store: one etcd member per host of the zone's `[consensus]` placement
//! (by default the database sites' hosts; the reference zone adds a second in DC2.1 and one
//! at the witness), in that host's namespace, talking across the APN emulator like
//! everything else.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
        format!("http://{}:{CLIENT_PORT}", self.ip)
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

/// Asks a member's /health from inside its namespace.
fn healthy(member: &EtcdMember) -> bool {
    let addr = SocketAddr::from((member.ip, CLIENT_PORT));
    let probe = move || -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(1500)));
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

    /// Starts every member that is not running (idempotent) and waits until the cluster
    /// answers. A member whose site is isolated is started but not waited for.
    pub fn etcd_up(&self, zone: &Zone) -> Result<Vec<EtcdMember>, LabError> {
        let members = self.etcd_members(zone);
        if members.is_empty() {
            return Ok(members);
        }
        let binary = etcd_binary()?;
        let cluster: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect();
        let cluster = cluster.join(",");
        let io = |what: String| move |source| LabError::Io { what, source };
        for m in &members {
            let pid_file = self.etcd_pid_file(m);
            let running = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .is_some_and(sys::alive);
            if running {
                continue;
            }
            let data = self.dir().join("etcd").join(&m.name);
            std::fs::create_dir_all(&data).map_err(io(format!("create {}", data.display())))?;
            let peer = format!("http://{}:{PEER_PORT}", m.ip);
            let client = m.client_url();
            let listen_client = format!("{client},http://127.0.0.1:{CLIENT_PORT}");
            let data_arg = data.display().to_string();
            let args = [
                "--name",
                &m.name,
                "--data-dir",
                &data_arg,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--listen-client-urls",
                &listen_client,
                "--advertise-client-urls",
                &client,
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
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
            let log = self.dir().join("etcd").join(format!("{}.log", m.name));
            let pid = self.spawn_daemon(&m.namespace, &binary, &args, &log, "etcd")?;
            std::fs::write(&pid_file, pid.to_string())
                .map_err(io(format!("write {}", pid_file.display())))?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let isolated = self.state().map(|s| s.isolated).unwrap_or_default();
        for m in members.iter().filter(|m| !isolated.contains(&m.site)) {
            while !healthy(m) {
                if Instant::now() > deadline {
                    return Err(LabError::BadValue {
                        field: format!("etcd member {}", m.name),
                        reason: format!(
                            "not healthy after 30 s; see {}",
                            self.dir()
                                .join("etcd")
                                .join(format!("{}.log", m.name))
                                .display()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(members)
    }

    /// Kills every etcd member of one site (a fault to inject); `etcd_up` restarts them.
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
