//! The zone's replicated database platform, as the operator drives it: one PostgreSQL
//! member per DC site (`dczone_db`), one HA agent beside each (`dczone_ha`), and the
//! operations on the whole: bring up and down, wait for a mode, planned switchover, the
//! guarded manual failover after a regional loss ([`recovery`]), the audit of every
//! acknowledged transfer, and a degraded status when consensus is lost.
//!
//! The operator holds no etcd credential: the platform's state and requests go through
//! the members' hosts' agents to their HA agents, in the lab ([`Database`], from inside a
//! client host's namespace) as with an access bundle ([`remote::Remote`]).

pub mod operator;
pub mod recovery;
pub mod remote;

pub use dczone_agent::recovery::EtcdMemberView;
pub use recovery::{DegradedStatus, FailoverReport};

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use dczone_db::Member;
use dczone_ha::agent::AgentConfig;
use dczone_ha::decide::Switchover;
use dczone_ha::keys::{Credentials, Snapshot};
use dczone_lab::{sys, Lab};
use dczone_ledger::{Audit, LoadOptions, LoadResult};
use dczone_zone::database::DatabasePlan;
use dczone_zone::Zone;

/// The lab's database password file (libpq's format; see [`dczone_db::ensure_passfile`]):
/// every member names it, and `dczone` points `PGPASSFILE` at it for its own clients.
pub fn passfile(lab: &Lab) -> PathBuf {
    lab.dir().join("db").join("pgpass")
}

/// The zone CA's certificate where `postgres` can read it: members and clients verify the
/// members' certificates against it.
pub fn ca_file(lab: &Lab) -> PathBuf {
    lab.dir().join("db").join("ca.crt")
}

/// The database platform of a lab that is up.
#[derive(Debug, Clone)]
pub struct Database {
    pub lab: Lab,
    pub zone: Zone,
    pub plan: DatabasePlan,
    pub members: Vec<Member>,
    /// The lab's access bundle, read once: every call to an agent uses it.
    access: std::sync::OnceLock<dczone_agent::access::Access>,
}

/// A certificate of the zone PKI as etcd's client credentials.
fn credentials(id: &dczone_pki::tls::Identity) -> Credentials {
    Credentials {
        ca: id.ca.clone(),
        cert: id.certificate.clone(),
        key: id.key.clone(),
    }
}

impl Database {
    pub fn open(lab: &Lab) -> anyhow::Result<Database> {
        let zone = lab.state()?.zone()?;
        let plan = zone.database.clone().ok_or_else(|| {
            anyhow!(
                "the lab's zone has no [database] section; add one (see `dczone zone show`) and \
                 run `dczone lab up --zone FILE`"
            )
        })?;
        let mut members = Vec::new();
        for site in plan.members() {
            let idx = zone.site_index(&site).expect("validated");
            let host = zone.sites[idx].hosts[plan.host_index].clone();
            let h = zone.host(&host).expect("validated");
            members.push(Member {
                app: dczone_db::app_name(&site),
                dir: lab.dir().join("db").join(&site),
                passfile: passfile(lab),
                ca: ca_file(lab),
                namespace: lab.host_namespace(&host),
                ip: h.ip(),
                host,
                site,
            });
        }
        Ok(Database {
            lab: lab.clone(),
            zone,
            plan,
            members,
            access: std::sync::OnceLock::new(),
        })
    }

    /// Where client-side commands run: the requested host, else `dc1.1-client` (the
    /// application's site), else a host of the first database site that is not cut off.
    pub fn client_host(&self, requested: Option<String>) -> anyhow::Result<String> {
        if let Some(h) = requested {
            self.lab.host(&h)?;
            return Ok(h);
        }
        let isolated = self.lab.state()?.isolated;
        let usable = |host: &str| {
            self.zone
                .host(host)
                .is_some_and(|h| !isolated.contains(&self.zone.sites[h.site].id))
        };
        if usable("dc1.1-client") {
            return Ok("dc1.1-client".into());
        }
        for site in self.plan.members() {
            let idx = self.zone.site_index(&site).expect("validated");
            let hosts = &self.zone.sites[idx].hosts;
            // Prefer a host that is not the database host itself.
            if let Some(h) = hosts.iter().rev().find(|h| usable(h)) {
                return Ok(h.clone());
            }
        }
        bail!("every database site is cut off; restore one with `dczone lab site restore`")
    }

    pub fn member(&self, site: &str) -> anyhow::Result<&Member> {
        self.members.iter().find(|m| m.site == site).ok_or_else(|| {
            anyhow!(
                "'{site}' is not a database site; they are {}",
                self.plan.members().join(", ")
            )
        })
    }

    pub fn hosts(&self) -> Vec<Ipv4Addr> {
        self.members.iter().map(|m| m.ip).collect()
    }

    /// The members' addresses in the order a client on `client` should try them: its own
    /// site first, then by one-way delay from it (ties in the zone's member order). A
    /// member that is down then costs a client a connect timeout only if it is nearer
    /// than the primary.
    pub fn hosts_for(&self, client: &str) -> Vec<Ipv4Addr> {
        let Some(from) = self.zone.host(client).map(|h| h.site) else {
            return self.hosts();
        };
        let params: Vec<_> = self.zone.links.iter().map(|l| l.params).collect();
        let cut = vec![false; params.len()];
        let mut ranked: Vec<(u64, usize, Ipv4Addr)> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let to = self.zone.site_index(&m.site).expect("validated");
                let delay = if to == from {
                    0
                } else {
                    self.zone.path(from, to, &params, &cut).one_way_delay_ns
                };
                (delay, i, m.ip)
            })
            .collect();
        ranked.sort_unstable();
        ranked.into_iter().map(|(_, _, ip)| ip).collect()
    }

    /// A libpq connection string that reaches whichever member accepts writes, for a
    /// client on `client`: every member, nearest first, `target_session_attrs=read-write`.
    /// libpq tries them in order and skips standbys; `connect_timeout` (libpq's minimum is
    /// 2 s) bounds what an unreachable member costs.
    pub fn conninfo(&self, client: &str) -> String {
        conninfo_for(&self.hosts_for(client))
    }

    /// An agent talks to its own site's etcd members only: if its site is cut off, its
    /// members are in the minority and every write it tries fails, as it must. The primary
    /// keeps etcd's raft leadership at the witness if there is one (no data site's loss
    /// then costs an etcd election), else at its own site.
    pub fn agent_config(&self, site: &str) -> anyhow::Result<AgentConfig> {
        let me = self.member(site)?;
        let etcd_credentials = credentials(&self.lab.consensus_identity(&me.host, Some(me.ip))?);
        let etcd = self.lab.etcd_members(&self.zone);
        let own = dczone_lab::etcd::client_urls(&etcd, |s| s == site);
        let is_witness = |s: &str| {
            self.zone
                .site_index(s)
                .is_some_and(|i| self.zone.sites[i].kind == dczone_zone::SiteKind::Witness)
        };
        let witness = dczone_lab::etcd::client_urls(&etcd, is_witness);
        Ok(AgentConfig {
            lab: self.lab.name().to_string(),
            site: site.to_string(),
            plan: self.plan.clone(),
            members: self.members.clone(),
            admitted: self.admitted(),
            etcd_leader_home: if witness.is_empty() {
                own.clone()
            } else {
                witness
            },
            etcd_endpoints: own,
            etcd_credentials,
        })
    }

    /// Who may connect to PostgreSQL over the network: the members, and every host of the
    /// database's sites (where its clients run), as `postgres`; a guest's address never as
    /// `postgres`. Applications (guests) of every site's network, as the application role.
    pub fn admitted(&self) -> dczone_db::Admitted {
        let mut clients = Vec::new();
        for site in self.plan.members() {
            let idx = self.zone.site_index(&site).expect("validated");
            for h in &self.zone.sites[idx].hosts {
                if let Some(h) = self.zone.host(h) {
                    clients.push(h.ip());
                }
            }
        }
        dczone_db::Admitted {
            members: self.hosts(),
            clients,
            apps: (0..self.zone.sites.len())
                .map(dczone_zone::lab_site_network)
                .collect(),
        }
    }

    /// Puts the database's password into the lab's access bundle (`access/pgpass`, 0600):
    /// an operator's clients need it to reach PostgreSQL from anywhere.
    fn share_password(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.lab.dir().join("access");
        std::fs::create_dir_all(&dir)?;
        let (to, tmp) = (dir.join("pgpass"), dir.join("pgpass.tmp"));
        std::fs::copy(passfile(&self.lab), &tmp)
            .with_context(|| format!("copy the database password to {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, &to)?;
        Ok(())
    }

    /// Readies `site`'s member directory for its HA agent, which calls this as it starts:
    /// the platform's password (made by the first member to start, never replaced), the
    /// zone CA for `postgres` to read, and the member's host certificate (issued by the
    /// lab's CA on first use, as for the host agents).
    pub fn prepare_member(&self, site: &str) -> anyhow::Result<()> {
        let m = self.member(site)?;
        std::fs::create_dir_all(self.lab.dir().join("db"))?;
        dczone_db::ensure_passfile(&passfile(&self.lab))?;
        let pki = dczone_pki::Pki::open_or_init(&self.lab.dir().join("pki"), self.lab.name())?;
        let ca = ca_file(&self.lab);
        if !ca.exists() {
            // Per process: members start at once.
            let tmp = ca.with_extension(format!("tmp.{}", std::process::id()));
            std::fs::copy(pki.ca_cert(), &tmp)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
            std::fs::rename(&tmp, &ca)?;
        }
        let (cert, key) = pki.ensure(dczone_pki::Role::Host, &m.host, &[m.ip.into()], 825)?;
        m.install_tls(&cert, &key)?;
        Ok(())
    }

    /// Calls `host`'s agent from inside `host`, with the lab's access bundle (the
    /// operator's certificate).
    fn host_agent(
        &self,
        host: &str,
        method: &str,
        path: &str,
    ) -> anyhow::Result<serde_json::Value> {
        self.agent_call(host, host, method, path, None, Duration::from_secs(30))
    }

    /// Calls `to`'s agent from inside host `from`, with the lab's access bundle (the
    /// operator's certificate).
    fn agent_call(
        &self,
        from: &str,
        to: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        self.agent_try(from, to, method, path, body, timeout)?
            .map_err(|e| match e {
                dczone_agent::CallError::Down { .. } => {
                    anyhow!("{e}; `dczone lab up` starts the lab's agents again")
                }
                e => anyhow!("{to}'s agent: {e}"),
            })
    }

    /// [`Database::agent_call`], with the call's own failure apart (the outer error: the
    /// bundle or the namespace).
    fn agent_try(
        &self,
        from: &str,
        to: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> anyhow::Result<Result<serde_json::Value, dczone_agent::CallError>> {
        let access = match self.access.get() {
            Some(a) => a,
            None => {
                let bundle = self.lab.dir().join("access");
                let a = dczone_agent::access::Access::open(&bundle)
                    .context("open the lab's access bundle (`dczone lab up` writes it)")?;
                self.access.get_or_init(|| a)
            }
        };
        let client = access.client(to)?;
        let (_, ns) = self.lab.host(from)?;
        let (method, path) = (method.to_string(), path.to_string());
        let call = sys::in_namespace(&ns, move || client.call(&method, &path, body, timeout))?;
        call.join()
            .map_err(|_| anyhow!("the call to {to}'s agent panicked"))
    }

    /// Starts the etcd members that are not running (idempotent), each through its host's
    /// agent, and waits until those not cut off answer.
    pub fn etcd_up(&self) -> anyhow::Result<()> {
        let mut hosts: Vec<String> = Vec::new();
        for m in self.lab.etcd_members(&self.zone) {
            if !hosts.contains(&m.host) {
                hosts.push(m.host);
            }
        }
        for host in &hosts {
            self.host_agent(host, "POST", "/v1/etcd")
                .with_context(|| format!("start the etcd members of {host}"))?;
        }
        Ok(self.lab.etcd_wait_up(&self.zone)?)
    }

    /// Starts the HA agent of `site` unless it runs, through its host's agent (which runs
    /// it beside itself; the HA agent then runs its PostgreSQL).
    pub fn start_ha_agent(&self, site: &str) -> anyhow::Result<()> {
        let m = self.member(site)?;
        self.host_agent(&m.host, "POST", &format!("/v1/db/{site}/ha-agent"))
            .with_context(|| format!("start the HA agent of {site}"))?;
        Ok(())
    }

    /// Stops the HA agent of `site` through its host's agent (its PostgreSQL dies with
    /// it); whether one ran. The call runs inside the member's host, so a site cut off
    /// from the rest is still fenced.
    pub fn stop_ha_agent(&self, site: &str) -> anyhow::Result<bool> {
        let m = self.member(site)?;
        let v = self
            .host_agent(&m.host, "DELETE", &format!("/v1/db/{site}/ha-agent"))
            .with_context(|| format!("stop the HA agent of {site}"))?;
        Ok(v["stopped"].as_bool().unwrap_or(false))
    }

    /// The last lines of a member's agent log, for error messages.
    pub fn agent_log_tail(&self, site: &str) -> String {
        let Ok(m) = self.member(site) else {
            return String::new();
        };
        let text = std::fs::read_to_string(m.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }

    /// Runs `f` on a thread inside `host`'s namespace, on its own single-threaded runtime.
    pub fn in_host<T, F, Fut>(&self, host: &str, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let (_, ns) = self.lab.host(host)?;
        let h = sys::in_namespace(&ns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(f())
        })?;
        h.join()
            .map_err(|_| anyhow!("the thread in {host} panicked"))
    }

    /// The platform's state as the HA agents read it from etcd, asked from inside `host`
    /// through the members' hosts' agents ([`Database::ask`]).
    pub fn snapshot(&self, host: &str) -> anyhow::Result<Snapshot> {
        let v = self
            .ask(host, "GET", "state", None)
            .context("read the platform's state through the agents")?;
        serde_json::from_value(v).context("read the platform's state: unreadable answer")
    }

    /// Sets the replication policy to `tier` through the agents, from inside `host` (the
    /// HA agent checks it against the zone's tiers; the primary applies it within a loop).
    pub fn set_policy(&self, host: &str, tier: &str) -> anyhow::Result<()> {
        self.ask(
            host,
            "PUT",
            "policy",
            Some(serde_json::json!({ "tier": tier })),
        )
        .context("set the policy through the agents")?;
        Ok(())
    }

    /// Asks the members' hosts' agents in turn, nearest first, from inside `from` (where
    /// the operator's command runs), until one answers `/v1/db/SITE/{what}`: each asks its
    /// HA agent, the only holder of etcd credentials, so a member whose site is cut off
    /// (in the minority) is passed over. An agent's refusal of the request itself ends it.
    fn ask(
        &self,
        from: &str,
        method: &str,
        what: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut failures = Vec::new();
        for ip in self.hosts_for(from) {
            let Some(m) = self.members.iter().find(|m| m.ip == ip) else {
                continue;
            };
            let path = format!("/v1/db/{}/{what}", m.site);
            match self.agent_try(
                from,
                &m.host,
                method,
                &path,
                body.clone(),
                Duration::from_secs(12),
            )? {
                Ok(v) => return Ok(v),
                Err(dczone_agent::CallError::Refused {
                    code: 400 | 403 | 409,
                    message,
                }) => return Err(remote::Refused(message).into()),
                Err(e) => failures.push(format!("{} (on {}): {e}", m.site, m.host)),
            }
        }
        bail!(
            "no database member's agent could answer: {}",
            failures.join("; ")
        )
    }

    /// The operator's commands as run from inside `host` ([`operator::Reach`]).
    pub fn at(&self, host: &str) -> AtHost<'_> {
        AtHost {
            db: self,
            host: host.to_string(),
        }
    }

    /// Planned switchover to the standby of `to` ([`operator::switchover`]), from the
    /// default client host.
    pub fn switchover(&self, to: &str, timeout: Duration) -> anyhow::Result<SwitchoverReport> {
        operator::switchover(&self.at(&self.client_host(None)?), to, timeout)
    }

    /// Waits until a primary accepts writes and every listed member but the primary streams
    /// from it.
    pub fn wait_ready(
        &self,
        host: &str,
        standbys: &[String],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let r = operator::wait_streaming(&self.at(host), standbys, timeout)?;
        r.map_err(|why| {
            let tails: Vec<String> = standbys
                .iter()
                .map(|s| format!("{s}: {}", self.agent_log_tail(s)))
                .collect();
            anyhow!(
                "the database platform is not ready after {} s: {why}; agent logs say: {}",
                timeout.as_secs(),
                tails.join("; ")
            )
        })
    }

    pub fn load(&self, host: &str, opts: LoadOptions) -> anyhow::Result<LoadResult> {
        self.in_host(host, move || dczone_ledger::run(opts))
    }

    pub fn audit(
        &self,
        host: &str,
        acked: Vec<String>,
        indeterminate: Vec<String>,
    ) -> anyhow::Result<Audit> {
        operator::audit(&self.at(host), acked, indeterminate)
    }

    /// The lab's audit logs ([`operator::AuditLog`]).
    pub fn audit_log(&self) -> operator::AuditLog {
        operator::AuditLog::new(&self.lab.dir().join("db"))
    }

    /// Appends ids to the audit logs that `db audit` reads.
    pub fn record(&self, result: &LoadResult) -> anyhow::Result<()> {
        self.audit_log().record(result)
    }

    pub fn recorded(&self) -> (Vec<String>, Vec<String>) {
        self.audit_log().recorded()
    }

    /// Brings the platform up (idempotent); returns the primary's site. The hosts' agents
    /// must run: they start the HA agents.
    pub fn up_within(&self, client: &str, timeout: Duration) -> anyhow::Result<String> {
        dczone_db::as_postgres("postgres")?;
        self.etcd_up()?;
        // After a manual failover rebuilt consensus on survivors: the members that are
        // back rejoin it.
        recovery::rejoin_consensus(&self.at(client))?;
        std::fs::create_dir_all(self.lab.dir().join("db"))?;
        dczone_db::ensure_passfile(&passfile(&self.lab))?;
        self.share_password()?;
        for m in &self.members {
            self.start_ha_agent(&m.site)?;
        }
        // The primary first (the standbys copy it once it leads), then the ledger.
        self.wait_ready(client, &[], timeout)?;
        operator::create_ledger(&self.at(client), timeout)?;
        let primary = self.wait_ready(client, &self.plan.members(), timeout)?;
        self.wait_mode(client, self.plan.policy().replication, timeout)?;
        Ok(primary)
    }

    /// Waits until the leader records `mode` (e.g. back to sync once the standbys caught up).
    pub fn wait_mode(
        &self,
        client: &str,
        mode: dczone_zone::database::Replication,
        timeout: Duration,
    ) -> anyhow::Result<Snapshot> {
        operator::wait_mode(&self.at(client), mode, timeout)
    }

    /// `db down` ([`recovery::down`]) from the default client host, then the lab's
    /// database directory (its password and CA copy) goes too.
    pub fn down(&self) -> anyhow::Result<recovery::Down> {
        let d = recovery::down(&self.at(&self.client_host(None)?))?;
        let _ = std::fs::remove_dir_all(self.lab.dir().join("db"));
        Ok(d)
    }

    /// `db failover` ([`recovery::failover`]) from the default client host.
    pub fn failover(
        &self,
        to: &str,
        accept_data_loss: bool,
        timeout: Duration,
    ) -> anyhow::Result<FailoverReport> {
        self.member(to)?;
        recovery::failover(
            &self.at(&self.client_host(None)?),
            to,
            accept_data_loss,
            timeout,
        )
    }
}

/// A libpq connection string that reaches whichever of `hosts` accepts writes:
/// `target_session_attrs=read-write`, tried in order. libpq skips standbys;
/// `connect_timeout` (libpq's minimum is 2 s) bounds what an unreachable member costs.
pub fn conninfo_for(hosts: &[Ipv4Addr]) -> String {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|ip| format!("{ip}:{}", dczone_db::PORT))
        .collect();
    format!(
        "postgresql://postgres@{}/{}?target_session_attrs=read-write&connect_timeout=2&application_name=dczone-client",
        hosts.join(","),
        dczone_db::DATABASE
    )
}

/// The lab's platform as seen from inside one host: what [`operator`]'s commands need.
#[derive(Debug)]
pub struct AtHost<'a> {
    db: &'a Database,
    host: String,
}

impl operator::Reach for AtHost<'_> {
    fn members(&self) -> Vec<(String, Ipv4Addr)> {
        let order = self.db.hosts_for(&self.host);
        order
            .into_iter()
            .filter_map(|ip| {
                let m = self.db.members.iter().find(|m| m.ip == ip)?;
                Some((m.site.clone(), ip))
            })
            .collect()
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        self.db.snapshot(&self.host)
    }

    fn request_switchover(&self, request: &Switchover) -> anyhow::Result<()> {
        // The HA agent stamps it with its own clock; the rest is the primary's to set.
        let body = serde_json::json!({ "from": request.from, "to": request.to });
        self.db
            .ask(&self.host, "POST", "switchover", Some(body))
            .context("file the switchover through the agents")?;
        Ok(())
    }

    fn clear_switchover(&self) -> anyhow::Result<()> {
        self.db
            .ask(&self.host, "DELETE", "switchover", None)
            .context("withdraw the switchover through the agents")?;
        Ok(())
    }

    fn in_client<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        self.db.in_host(&self.host, f)
    }
}

/// The lab reaches a host's agent from inside that host (so that a cut-off site is still
/// fenced and stopped), and tells whether the agent answers from the client host, where
/// the operator stands.
impl recovery::Hosts for AtHost<'_> {
    fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        self.db.agent_call(host, host, method, path, body, timeout)
    }

    fn answers(&self, host: &str) -> bool {
        self.db
            .agent_call(
                &self.host,
                host,
                "GET",
                "/v1/health",
                None,
                Duration::from_secs(2),
            )
            .is_ok()
    }

    fn member_hosts(&self) -> Vec<(String, String)> {
        self.db
            .members
            .iter()
            .map(|m| (m.site.clone(), m.host.clone()))
            .collect()
    }

    fn consensus_hosts(&self) -> Vec<(String, String)> {
        let mut hosts: Vec<(String, String)> = Vec::new();
        for m in self.db.lab.etcd_members(&self.db.zone) {
            if !hosts.iter().any(|(h, _)| *h == m.host) {
                hosts.push((m.host, m.site));
            }
        }
        hosts
    }

    fn direct_views(&self) -> anyhow::Result<Vec<dczone_db::DirectView>> {
        let members = self.db.members.clone();
        self.db.in_host(&self.host, move || async move {
            let reads = members
                .iter()
                .map(|m| dczone_db::direct_view(m, Duration::from_millis(700)));
            futures_util::future::join_all(reads).await
        })
    }
}

/// What `db switchover` measured, each from the request.
#[derive(Debug, Serialize)]
pub struct SwitchoverReport {
    pub from: String,
    pub to: String,
    /// Until the target held the leader key.
    pub leader_ms: f64,
    /// Until the new primary acknowledged a commit (under its synchronous policy).
    pub first_commit_ms: f64,
    /// Until the old primary was a running standby again.
    pub rejoined_ms: f64,
}
