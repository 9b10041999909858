//! The operator's access bundle, and remote mode: everything an operator needs to drive a
//! zone's agents over the network, with no namespace entry and no shared file.
//!
//! ```text
//! <dir>/zone.toml      the zone's hosts, each with its site and agent = "https://IP:PORT"
//! <dir>/ca.crt         the zone CA certificate
//! <dir>/operator.crt   the operator's certificate
//! <dir>/operator.key   its key (0600)
//! <dir>/pgpass         the database's password (libpq's format, 0600; `db up` adds it)
//! ```
//!
//! `dczone --access DIR` (env `DCZONE_ACCESS`) reads it and calls the agents directly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use dczone_pki::tls::{client_config, ClientConfig, Identity};
use dczone_virt::VmRecord;

use dczone_virt::migrate::{
    group_plan, migrate_plan, GroupMigration, Leg, Params, Progress, Strategy,
};
use dczone_virt::VirtError;

use crate::leg::{AgentLeg, LegBody};
use crate::{AgentClient, CallError};

/// `zone.toml` of an access bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// The zone's name.
    pub zone: String,
    pub hosts: Vec<BundleHost>,
    /// The zone's replicated database, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<BundleDatabase>,
}

/// The database platform as an operator reaches it: its members, in the zone's order.
/// The state and switchovers go through the members' hosts' agents (to the HA agents);
/// clients connect to PostgreSQL directly, with the bundle's `pgpass` and `ca.crt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleDatabase {
    /// The zone file's replication policy (a tier), until `db policy` sets another.
    pub tier: String,
    /// How that tier's commits reach the standbys: what `db up` waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<dczone_zone::database::Replication>,
    pub members: Vec<BundleMember>,
    /// The hosts that run the zone's etcd members (one each), in the zone's order: a
    /// manual failover asks and rebuilds consensus through their agents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consensus: Vec<String>,
    /// The site of the consensus store's tiebreaker (no data), if the zone has one: the
    /// primary keeps etcd's raft leadership there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<String>,
    /// Addresses of the database's clients besides the members, admitted by
    /// `pg_hba.conf`; default: every host of the members' sites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<std::net::Ipv4Addr>,
    /// Networks (CIDR) whose application servers may use the ledger database as the
    /// application role (`dczone_db::APP_ROLE`); default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_networks: Vec<String>,
    /// The platform's replication plan (primary, standbys, tiers, HA timings), which a real
    /// host's HA agents run under (`[database.plan]`, as the lab's bundle shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<dczone_zone::database::DatabasePlan>,
}

/// One PostgreSQL member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleMember {
    pub site: String,
    /// The host it runs on (its agent is in `hosts`).
    pub host: String,
    /// The address PostgreSQL listens on (its port is the platform's, 5432).
    pub address: std::net::Ipv4Addr,
}

/// One host of the zone and its agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleHost {
    pub id: String,
    pub site: String,
    /// The agent's endpoint, `https://IP:PORT`.
    pub agent: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read {}: {reason}; an access bundle holds zone.toml, ca.crt, operator.crt and operator.key (`dczone lab up` writes one to <state-dir>/<lab>/access)", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Bad { path: PathBuf, reason: String },
    #[error("host '{host}' is not in the access bundle; its hosts are: {known}")]
    UnknownHost { host: String, known: String },
    #[error("unknown VM '{vm}': no agent of the zone knows it{}", unreachable_note(.unreachable))]
    UnknownVm {
        vm: String,
        unreachable: Vec<String>,
    },
    #[error(transparent)]
    Tls(#[from] dczone_pki::tls::TlsError),
    #[error("site '{site}' has no VM host in the access bundle; its sites are: {known}")]
    UnknownSite { site: String, known: String },
    #[error("the agents of {} did not answer: a group's VMs cannot all be found; retry when they do", .0.join(", "))]
    Unreachable(Vec<String>),
    #[error(transparent)]
    Virt(#[from] dczone_virt::VirtError),
}

fn unreachable_note(hosts: &[String]) -> String {
    if hosts.is_empty() {
        String::new()
    } else {
        format!(" (unreachable: {})", hosts.join(", "))
    }
}

impl BundleHost {
    /// The agent's address, from `agent = "https://IP:PORT"`.
    pub fn address(&self) -> Option<SocketAddr> {
        self.agent.strip_prefix("https://")?.parse().ok()
    }
}

impl Bundle {
    /// Reads and checks a zone file (`zone.toml` of an access bundle).
    pub fn read(path: &Path) -> Result<Bundle, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|e| AccessError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let bundle: Bundle = toml::from_str(&text).map_err(|e| AccessError::Bad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        for h in &bundle.hosts {
            if h.address().is_none() {
                return Err(AccessError::Bad {
                    path: path.to_path_buf(),
                    reason: format!(
                        "host {}: agent = \"{}\" must be https://IP:PORT",
                        h.id, h.agent
                    ),
                });
            }
        }
        Ok(bundle)
    }

    /// Writes `zone.toml` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = format!(
            "# dczone access bundle: the zone's hosts and their agents\n{}",
            toml::to_string(self).map_err(std::io::Error::other)?
        );
        // Unchanged: left alone. Changed: replaced at once (another command may be
        // reading it).
        let file = dir.join("zone.toml");
        if std::fs::read_to_string(&file).is_ok_and(|old| old == text) {
            return Ok(());
        }
        let tmp = dir.join(format!("zone.toml.tmp.{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &file)
    }
}

/// An opened access bundle: the zone's agents, called with the operator's certificate.
#[derive(Debug, Clone)]
pub struct Access {
    pub dir: PathBuf,
    pub bundle: Bundle,
    tls: Arc<ClientConfig>,
}

/// A VM as an agent reported it.
pub type Found = (String, VmRecord);

impl Access {
    pub fn open(dir: &Path) -> Result<Access, AccessError> {
        let bundle = Bundle::read(&dir.join("zone.toml"))?;
        let tls = client_config(&dir.join("ca.crt"), Some(&Identity::operator(dir)))?;
        Ok(Access {
            dir: dir.to_path_buf(),
            bundle,
            tls,
        })
    }

    /// `host`'s agent endpoint.
    pub fn agent_url(&self, host: &str) -> Result<&str, AccessError> {
        self.bundle
            .hosts
            .iter()
            .find(|h| h.id == host)
            .map(|h| h.agent.as_str())
            .ok_or_else(|| AccessError::UnknownHost {
                host: host.into(),
                known: self
                    .bundle
                    .hosts
                    .iter()
                    .map(|h| h.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A client of `host`'s agent.
    pub fn client(&self, host: &str) -> Result<AgentClient, AccessError> {
        Ok(AgentClient::new(self.agent_url(host)?, self.tls.clone()))
    }

    /// Every VM of the zone, asking every agent at once; and the hosts whose agent did not
    /// answer (their VMs are missing from the list).
    pub fn list(&self) -> (Vec<Found>, Vec<String>) {
        let answers: Vec<(String, Result<Value, CallError>)> = std::thread::scope(|s| {
            let calls: Vec<_> = self
                .bundle
                .hosts
                .iter()
                .map(|h| {
                    let c = AgentClient::new(&h.agent, self.tls.clone());
                    let id = h.id.clone();
                    s.spawn(move || (id, c.call("GET", "/v1/vms", None, Duration::from_secs(5))))
                })
                .collect();
            calls.into_iter().filter_map(|c| c.join().ok()).collect()
        });
        let mut vms = Vec::new();
        let mut unreachable = Vec::new();
        for (host, answer) in answers {
            match answer.map(serde_json::from_value::<Vec<VmRecord>>) {
                Ok(Ok(list)) => vms.extend(list.into_iter().map(|v| (host.clone(), v))),
                _ => unreachable.push(host),
            }
        }
        vms.sort_by(|a, b| a.1.spec.name.cmp(&b.1.spec.name));
        (vms, unreachable)
    }

    /// Migrates every VM of `group` to site `to_site` (VM i to the site's VM host i mod n)
    /// with `strategy`: this process coordinates, each VM's source host's agent does the
    /// source half ([`crate::leg`]).
    pub fn migrate_group(
        &self,
        group: &str,
        to_site: &str,
        strategy: Strategy,
        params: &Params,
        progress: &dyn Fn(&[Progress]),
    ) -> Result<GroupMigration, AccessError> {
        let hosts: Vec<String> = self
            .bundle
            .hosts
            .iter()
            .filter(|h| h.site == to_site && !h.id.contains("client"))
            .map(|h| h.id.clone())
            .collect();
        if hosts.is_empty() {
            let mut known: Vec<&str> = self.bundle.hosts.iter().map(|h| h.site.as_str()).collect();
            known.dedup();
            return Err(AccessError::UnknownSite {
                site: to_site.into(),
                known: known.join(", "),
            });
        }
        let (vms, unreachable) = self.list();
        if !unreachable.is_empty() {
            return Err(AccessError::Unreachable(unreachable));
        }
        let plan = group_plan(group, vms.into_iter().map(|(_, v)| v).collect(), &hosts)?;
        let postcopy = strategy == Strategy::Postcopy;
        let open = |vm: &VmRecord, to: &str, port: u16| -> Result<Box<dyn Leg>, VirtError> {
            let failed = |reason: String| VirtError::MigrationFailed {
                vm: vm.spec.name.clone(),
                source_host: vm.host.clone(),
                reason,
            };
            let client = self.client(&vm.host).map_err(|e| failed(e.to_string()))?;
            let body = LegBody {
                to: to.into(),
                agent: Some(
                    self.agent_url(to)
                        .map_err(|e| failed(e.to_string()))?
                        .into(),
                ),
                port,
                postcopy,
                params: *params,
            };
            Ok(Box::new(AgentLeg::open(
                client,
                &vm.spec.name,
                &vm.host,
                &body,
            )?))
        };
        Ok(migrate_plan(plan, strategy, params, progress, &open)?)
    }

    /// The host whose agent has VM `name`.
    pub fn find(&self, name: &str) -> Result<Found, AccessError> {
        let (vms, unreachable) = self.list();
        vms.into_iter()
            .find(|(_, v)| v.spec.name == name)
            .ok_or(AccessError::UnknownVm {
                vm: name.into(),
                unreachable,
            })
    }
}
