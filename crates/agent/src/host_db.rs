//! The database platform on a real host (`dczoned --zone`): what its HA agents run under,
//! from the zone file alone, as the lab builds it from its zone.
//! - Each member lives in `<data dir>/db/<site>` with the platform's password in `<data
//!   dir>/db/pgpass` (sent by the operator's `db up`: [`crate::AgentRequest::DbSetPassword`])
//!   and the zone CA in `<data dir>/db/ca.crt`; PostgreSQL serves with the host's own
//!   certificate (`<pki>/hosts/<host>.crt`).
//! - Its HA agent is this same binary (`dczoned --zone ... --ha-agent SITE`), started by
//!   the host's agent, and talks to its site's etcd members with the host's consensus
//!   certificate (`<pki>/consensus/<host>.crt`).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use dczone_ha::agent::AgentConfig;
use dczone_ha::keys::Credentials;
use dczone_lab::etcd::EtcdMember;
use dczone_zone::database::DatabasePlan;

use crate::access::BundleDatabase;
use crate::HostZone;
use crate::{AgentError, VirtError};

/// Why a real host cannot run a database member.
#[derive(Debug, thiserror::Error)]
pub enum HostDbError {
    #[error("the zone file {file} has no [database] section{hint}")]
    NoDatabase { file: String, hint: &'static str },
    #[error("the zone file's [database]: {0}")]
    Bad(String),
    #[error("'{site}' is not a database site of the zone file; they are {known}")]
    NotMember { site: String, known: String },
    #[error("database site '{site}' runs on {owner}, not on this host ({host})")]
    Elsewhere {
        site: String,
        owner: String,
        host: String,
    },
    #[error("prepare the member of {site}: {reason}")]
    Prepare { site: String, reason: String },
}

impl HostZone {
    /// The zone file's `[database]`, with its plan.
    fn database(&self) -> Result<(&BundleDatabase, &DatabasePlan), HostDbError> {
        let file = self.file.display().to_string();
        let db = self
            .bundle
            .database
            .as_ref()
            .ok_or(HostDbError::NoDatabase {
                file: file.clone(),
                hint: "",
            })?;
        let plan = db.plan.as_ref().ok_or(HostDbError::NoDatabase {
            file,
            hint: " with a plan: add [database.plan] (primary, standbys, tier, policies, ha; \
                   a lab's access bundle shows one)",
        })?;
        Ok((db, plan))
    }

    /// Where this host's database members keep their directories.
    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    /// Refuses a site whose member is not on `host`.
    pub fn own_member(&self, host: &str, site: &str) -> Result<(), HostDbError> {
        let (db, _) = self.database()?;
        let m =
            db.members
                .iter()
                .find(|m| m.site == site)
                .ok_or_else(|| HostDbError::NotMember {
                    site: site.into(),
                    known: db
                        .members
                        .iter()
                        .map(|m| m.site.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        if m.host != host {
            return Err(HostDbError::Elsewhere {
                site: site.into(),
                owner: m.host.clone(),
                host: host.into(),
            });
        }
        Ok(())
    }

    /// The zone file's etcd members (`[database] consensus`): one per host, at its agent's
    /// address, in the host's own namespace.
    pub fn etcd_members(&self) -> Result<Vec<EtcdMember>, HostDbError> {
        let hosts = self
            .bundle
            .database
            .as_ref()
            .map(|d| d.consensus.clone())
            .unwrap_or_default();
        if hosts.is_empty() {
            return Err(HostDbError::Bad(
                "it names no etcd hosts: add `consensus = [\"HOST\", ...]` (an odd number, one \
                 member each)"
                    .into(),
            ));
        }
        hosts
            .iter()
            .map(|id| {
                let h = self.bundle.hosts.iter().find(|x| x.id == *id);
                let ip = h.and_then(|h| ipv4(h.address()?.ip()));
                match (h, ip) {
                    (Some(h), Some(ip)) => Ok(EtcdMember {
                        name: dczone_zone::database::app_name(id),
                        site: h.site.clone(),
                        host: id.clone(),
                        namespace: String::new(),
                        ip,
                    }),
                    _ => Err(HostDbError::Bad(format!(
                        "etcd host '{id}' is not one of the zone file's [[hosts]] with an IPv4 \
                         agent address"
                    ))),
                }
            })
            .collect()
    }

    /// This host's consensus certificate, as its etcd member and HA agents show it.
    pub fn consensus_credentials(&self, host: &str) -> Credentials {
        let dir = self.pki.join("consensus");
        Credentials {
            ca: self.pki.join("ca.crt"),
            cert: dir.join(format!("{host}.crt")),
            key: dir.join(format!("{host}.key")),
        }
    }

    /// Every member as its HA agent and its peers see it.
    fn members(&self) -> Result<Vec<dczone_db::Member>, HostDbError> {
        let (db, plan) = self.database()?;
        let dir = self.db_dir();
        plan.members()
            .iter()
            .map(|site| {
                let m = db.members.iter().find(|m| &m.site == site).ok_or_else(|| {
                    HostDbError::Bad(format!(
                        "the plan's site '{site}' is not among its members (site, host, address)"
                    ))
                })?;
                Ok(dczone_db::Member {
                    site: site.clone(),
                    app: dczone_db::app_name(site),
                    host: m.host.clone(),
                    namespace: String::new(),
                    ip: m.address,
                    dir: dir.join(site),
                    passfile: dir.join("pgpass"),
                    ca: dir.join("ca.crt"),
                })
            })
            .collect()
    }

    /// Who may connect to PostgreSQL: the members, and the zone file's clients (default:
    /// every host of the members' sites).
    fn admitted(&self, members: &[dczone_db::Member]) -> Result<dczone_db::Admitted, HostDbError> {
        let (db, _) = self.database()?;
        let clients = if db.clients.is_empty() {
            self.bundle
                .hosts
                .iter()
                .filter(|h| members.iter().any(|m| m.site == h.site))
                .filter_map(|h| ipv4(h.address()?.ip()))
                .collect()
        } else {
            db.clients.clone()
        };
        let apps = db
            .app_networks
            .iter()
            .map(|n| {
                dczone_db::network(n).ok_or_else(|| {
                    HostDbError::Bad(format!(
                        "app_networks: '{n}' is not an IPv4 network; write it as 10.77.2.0/24"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(dczone_db::Admitted {
            members: members.iter().map(|m| m.ip).collect(),
            clients,
            apps,
        })
    }

    /// What the HA agent of `site` on `host` runs under. It talks to its own site's etcd
    /// members only (cut off, its writes fail, as they must); the primary keeps etcd's
    /// raft leadership at the witness if the zone file names one, else at its own site.
    pub fn ha_config(&self, host: &str, site: &str) -> Result<AgentConfig, HostDbError> {
        self.own_member(host, site)?;
        let (db, plan) = self.database()?;
        let members = self.members()?;
        let etcd = self.etcd_members()?;
        let own = dczone_lab::etcd::client_urls(&etcd, |s| s == site);
        if own.is_empty() {
            return Err(HostDbError::Bad(format!(
                "no etcd host in site '{site}': its HA agent talks to its own site's members"
            )));
        }
        let witness = match db.witness.as_deref() {
            Some(w) => {
                let at = dczone_lab::etcd::client_urls(&etcd, |s| s == w);
                if at.is_empty() {
                    return Err(HostDbError::Bad(format!(
                        "witness site '{w}' has no etcd host in `consensus`"
                    )));
                }
                at
            }
            None => Vec::new(),
        };
        Ok(AgentConfig {
            lab: self.bundle.zone.clone(),
            site: site.into(),
            plan: plan.clone(),
            admitted: self.admitted(&members)?,
            members,
            etcd_leader_home: if witness.is_empty() {
                own.clone()
            } else {
                witness
            },
            etcd_endpoints: own,
            etcd_credentials: self.consensus_credentials(host),
        })
    }

    /// Readies `site`'s member directory for its HA agent: the platform's password must be
    /// there (the operator's `db up` sends it), the zone CA is copied where `postgres` can
    /// read it, and PostgreSQL gets the host's certificate.
    pub fn prepare_member(&self, host: &str, site: &str) -> Result<(), HostDbError> {
        let fail = |reason: String| HostDbError::Prepare {
            site: site.into(),
            reason,
        };
        self.own_member(host, site)?;
        let members = self.members()?;
        let m = members
            .iter()
            .find(|m| m.site == site)
            .ok_or_else(|| fail("not a member".into()))?;
        if !m.passfile.exists() {
            return Err(fail(format!(
                "{} does not exist: `dczone --access DIR db up` sends the platform's password",
                m.passfile.display()
            )));
        }
        std::fs::create_dir_all(&m.dir)
            .map_err(|e| fail(format!("create {}: {e}", m.dir.display())))?;
        let tmp = m.ca.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::copy(self.pki.join("ca.crt"), &tmp)
            .and_then(|_| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            })
            .and_then(|_| std::fs::rename(&tmp, &m.ca))
            .map_err(|e| fail(format!("install the zone CA as {}: {e}", m.ca.display())))?;
        let id = dczone_pki::tls::Identity::host(&self.pki, host);
        m.install_tls(&id.certificate, &id.key)
            .map_err(|e| fail(dczone_lab::error_chain(&e)))
    }
}

fn ipv4(ip: std::net::IpAddr) -> Option<Ipv4Addr> {
    match ip {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(_) => None,
    }
}

impl crate::Agent {
    /// Starts the HA agent of `site` on a real host: this binary with `--ha-agent SITE`,
    /// detached, its output in `<db dir>/<site>/agent.log`.
    pub(crate) fn ha_start_on_host(&self, site: &str) -> Result<serde_json::Value, AgentError> {
        let hz = self.host_zone.as_ref().ok_or_else(|| {
            AgentError::Virt(VirtError::BadSpec("this agent knows no zone".into()))
        })?;
        let fail = |reason: String| AgentError::Ha {
            site: site.into(),
            reason,
        };
        // Refused here rather than in the HA agent's log: no plan, no password.
        hz.ha_config(&self.host, site)
            .map_err(|e| fail(e.to_string()))?;
        let passfile = hz.db_dir().join("pgpass");
        if !passfile.exists() {
            return Err(fail(format!(
                "{} does not exist: `dczone --access DIR db up` sends the platform's password \
                 before it starts the HA agents",
                passfile.display()
            )));
        }
        let exe = std::env::current_exe().map_err(|e| fail(format!("find this binary: {e}")))?;
        let dir = hz.db_dir().join(site);
        let (file, pki, data) = (
            hz.file.display().to_string(),
            hz.pki.display().to_string(),
            hz.data_dir.display().to_string(),
        );
        let args = [
            "--zone",
            file.as_str(),
            "--host",
            self.host.as_str(),
            "--pki",
            pki.as_str(),
            "--data-dir",
            data.as_str(),
            "--ha-agent",
            site,
        ];
        let pid =
            dczone_lab::spawn_detached(None, &exe, &args, &dir.join("agent.log"), "the HA agent")
                .map_err(|e| fail(dczone_lab::error_chain(&e)))?;
        let pid_file = dir.join("agent.pid");
        std::fs::write(&pid_file, pid.to_string()).map_err(|source| {
            AgentError::Virt(VirtError::Io {
                what: format!("write {}", pid_file.display()),
                source,
            })
        })?;
        Ok(serde_json::json!({ "site": site, "pid": pid, "started": true }))
    }

    /// Installs the platform's password for `site`'s member on this host
    /// (`<db dir>/pgpass`): written if there is none, kept if it is the same, refused (409)
    /// if it is another.
    pub(crate) fn db_set_password(
        &self,
        site: &str,
        pgpass: &str,
    ) -> Result<serde_json::Value, AgentError> {
        self.own_member(site)?;
        let password = dczone_db::password_in(pgpass).ok_or_else(|| {
            AgentError::Virt(VirtError::BadSpec(
                "pgpass holds no line for user postgres (*:*:*:postgres:PASSWORD)".into(),
            ))
        })?;
        let file = self.db_dir.join("pgpass");
        match dczone_db::install_password(&file, &password) {
            Ok(installed) => Ok(serde_json::json!({ "site": site, "installed": installed })),
            Err(dczone_db::DbError::Step { detail, .. }) if file.exists() => Err(
                AgentError::Conflict(format!("{}: {detail}", file.display())),
            ),
            Err(e) => Err(AgentError::Ha {
                site: site.into(),
                reason: dczone_lab::error_chain(&e),
            }),
        }
    }
}
