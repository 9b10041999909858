//! The zone's replicated database platform, as the operator drives it: one PostgreSQL
//! member per DC site (`dczone_db`), one HA agent beside each (`dczone_ha`), the consensus
//! store's credentials, and the operations on the whole: bring up and down, wait for a
//! mode, planned switchover, the guarded manual failover after a regional loss, the audit
//! of every acknowledged transfer, and a degraded status when consensus is lost.
//!
//! In the lab, everything here still reaches members and etcd from inside the hosts'
//! namespaces with the lab's consensus certificate `operator` (see ARCHITECTURE.md, the
//! one named exception to "only HA agents hold etcd credentials"); routing it through the
//! HA agents is open (issue 11, item 1).

pub mod operator;
pub mod remote;

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use dczone_db::Member;
use dczone_ha::agent::AgentConfig;
use dczone_ha::decide::Switchover;
use dczone_ha::keys::{Credentials, Snapshot, Store, StoreError};
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
    pub etcd: Vec<String>,
    /// What the operator's `db` commands show etcd: the lab's consensus certificate
    /// `operator` (lab mode only: it is not in the access bundle; the HA agents show their
    /// hosts').
    pub etcd_tls: Credentials,
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
        let etcd = lab
            .etcd_members(&zone)
            .iter()
            .map(|m| m.client_url())
            .collect();
        Ok(Database {
            lab: lab.clone(),
            zone,
            plan,
            members,
            etcd,
            etcd_tls: credentials(&lab.consensus_identity("operator", None)?),
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
        let urls = |keep: &dyn Fn(&str) -> bool| -> Vec<String> {
            etcd.iter()
                .filter(|m| keep(&m.site))
                .map(|m| m.client_url())
                .collect()
        };
        let own = urls(&|s| s == site);
        let is_witness = |s: &str| {
            self.zone
                .site_index(s)
                .is_some_and(|i| self.zone.sites[i].kind == dczone_zone::SiteKind::Witness)
        };
        let witness = urls(&is_witness);
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
    /// database's sites (where its clients run). A guest's address is never among them.
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
        let bundle = self.lab.dir().join("access");
        let access = dczone_agent::access::Access::open(&bundle)
            .context("open the lab's access bundle (`dczone lab up` writes it)")?;
        let client = access.client(host)?;
        let (_, ns) = self.lab.host(host)?;
        let (method, path) = (method.to_string(), path.to_string());
        let call = sys::in_namespace(&ns, move || {
            client.call(&method, &path, None, Duration::from_secs(30))
        })?;
        call.join()
            .map_err(|_| anyhow!("the call to {host}'s agent panicked"))?
            .map_err(|e| match e {
                dczone_agent::CallError::Down { .. } => {
                    anyhow!("{e}; `dczone lab up` starts the lab's agents again")
                }
                e => anyhow!("{host}'s agent: {e}"),
            })
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

    /// A snapshot of the platform's etcd keys, read from `host`. etcd answers "leader
    /// changed" for a moment while its raft leadership moves (a site lost, a switchover):
    /// the read is retried for up to a second.
    pub fn snapshot(&self, host: &str) -> anyhow::Result<Snapshot> {
        self.with_store(host, |store| async move {
            let mut attempt = 0;
            loop {
                match store.snapshot().await {
                    Err(e) if attempt < 4 && e.is_transient() => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    r => return r,
                }
            }
        })
        .context("read the platform's state from etcd")
    }

    /// Runs `f` with an etcd client connected from inside `host` with this command's
    /// credentials; a store error keeps its type (callers tell unreadable credentials
    /// from a lost quorum).
    fn with_store<T, F, Fut>(&self, host: &str, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Store) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let (lab, etcd, tls) = (
            self.lab.name().to_string(),
            self.etcd.clone(),
            self.etcd_tls.clone(),
        );
        Ok(self.in_host(host, move || async move {
            f(Store::connect(&lab, &etcd, &tls).await?).await
        })??)
    }

    pub fn put_key<T: Serialize + Send + 'static>(
        &self,
        host: &str,
        key: fn(&dczone_ha::keys::Keys) -> String,
        value: T,
    ) -> anyhow::Result<()> {
        self.with_store(host, move |store| async move {
            store.put_json(&key(&store.keys), &value, None).await
        })
        .context("write to etcd")
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

    pub fn delete_key(
        &self,
        host: &str,
        key: fn(&dczone_ha::keys::Keys) -> String,
    ) -> anyhow::Result<()> {
        self.with_store(host, move |store| async move {
            store.delete(&key(&store.keys)).await
        })
        .context("delete from etcd")
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
        self.rejoin_consensus(client)?;
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

    pub fn down(&self) -> anyhow::Result<usize> {
        let mut n = 0;
        for m in &self.members {
            if self.stop_ha_agent(&m.site)? {
                n += 1;
            }
        }
        let host = self.members[0].host.clone();
        let _ = self.with_store(&host, |store| async move { store.delete_prefix().await });
        let _ = std::fs::remove_dir_all(self.lab.dir().join("db"));
        Ok(n)
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
        self.db
            .put_key(&self.host, |k| k.switchover(), request.clone())
    }

    fn clear_switchover(&self) -> anyhow::Result<()> {
        self.db.delete_key(&self.host, |k| k.switchover())
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

/// What `db failover` did.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub to: String,
    /// The target provably held every acknowledged commit.
    pub proven: bool,
    pub target_lsn: String,
    /// What may be lost (only with --accept-data-loss): from the target's WAL end to the
    /// furthest WAL end read elsewhere.
    pub lost_from_lsn: Option<String>,
    pub lost_to_lsn: Option<String>,
    pub transactions_at_most: Option<u64>,
    /// Members whose WAL could not be read: what they acknowledged past the target is unknown.
    pub unknown: Vec<String>,
    pub wal_ends: Vec<dczone_ha::manual::WalEnd>,
    /// Members whose HA agent (and PostgreSQL with it) was stopped.
    pub fenced: Vec<String>,
    /// The etcd member the consensus store was rebuilt on, and those that rejoined it.
    pub consensus_rebuilt_on: String,
    pub consensus_rejoined: Vec<String>,
    pub leader_ms: f64,
    pub first_commit_ms: f64,
}

impl Database {
    /// Can `host` open TCP to `ip`'s PostgreSQL port (a refusal counts: the host answers)?
    fn host_answers(&self, host: &str, ip: Ipv4Addr) -> bool {
        self.in_host(host, move || async move {
            let addr = std::net::SocketAddr::from((ip, dczone_db::PORT));
            match tokio::time::timeout(
                Duration::from_millis(700),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
                Err(_) => false,
            }
        })
        .unwrap_or(false)
    }

    /// Re-adds the zone's etcd members that are out of the cluster (after a rebuild) and
    /// whose hosts `host` reaches, one at a time; returns their names.
    pub fn rejoin_consensus(&self, host: &str) -> anyhow::Result<Vec<String>> {
        let mut done = Vec::new();
        for m in self.lab.etcd_missing(&self.zone) {
            if !self.host_answers(host, m.ip) {
                continue;
            }
            let current: Vec<String> = self
                .lab
                .etcd_members(&self.zone)
                .iter()
                .filter(|x| {
                    self.lab
                        .etcd_membership()
                        .is_some_and(|names| names.contains(&x.name))
                })
                .map(|x| x.client_url())
                .collect();
            let (lab, peer, tls) = (
                self.lab.name().to_string(),
                m.peer_url(),
                self.etcd_tls.clone(),
            );
            self.in_host(host, move || async move {
                let store = Store::connect(&lab, &current, &tls).await?;
                // etcd refuses a reconfiguration ("unhealthy cluster") until every member
                // has been connected for 5 s: a member that just rejoined delays the next.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let added = async {
                        if !store.member_peer_urls().await?.contains(&peer) {
                            store.member_add(&peer).await?;
                        }
                        Ok::<_, dczone_ha::keys::StoreError>(())
                    };
                    match added.await {
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        r => return r,
                    }
                }
            })?
            .with_context(|| format!("add etcd member {} back to the cluster", m.name))?;
            self.lab.etcd_rejoin(&self.zone, &m.name)?;
            done.push(m.name.clone());
        }
        Ok(done)
    }

    /// `db failover --to SITE [--accept-data-loss]`: the guarded manual failover when
    /// consensus is lost; refused while consensus answers (the HA agents act then).
    pub fn failover(
        &self,
        to: &str,
        accept_data_loss: bool,
        timeout: Duration,
    ) -> anyhow::Result<FailoverReport> {
        use dczone_ha::manual::{lsn_text, verdict, Verdict, WalEnd};
        let target = self.member(to)?.clone();
        let host = self.client_host(None)?;
        match self.snapshot(&host) {
            Ok(snap) => bail!(
                "consensus answers (primary: {}): the HA agents fail over by themselves when a \
                 primary is lost, under the RPO rule; for a planned move use `dczone db \
                 switchover --to {to}`",
                snap.leader.map_or("none".into(), |l| l.site)
            ),
            // Our own credentials failing says nothing about consensus: never fence on it.
            Err(e)
                if e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<dczone_ha::keys::StoreError>(),
                        Some(dczone_ha::keys::StoreError::Credential { .. })
                    )
                }) =>
            {
                return Err(e.context(
                    "cannot tell whether consensus is lost: this command's etcd credentials \
                     are unreadable; nothing was fenced",
                ));
            }
            Err(_) => {}
        }
        let t0 = Instant::now();
        let members = self.members.clone();
        let views = self.in_host(&host, move || async move {
            let reads = members
                .iter()
                .map(|m| dczone_db::direct_view(m, Duration::from_millis(700)));
            futures_util::future::join_all(reads).await
        })?;
        let view = |site: &str| {
            views
                .iter()
                .find(|v| v.site == site)
                .expect("one per member")
        };
        let tv = view(to);
        if tv.role != "standby" {
            bail!(
                "{to} is not a running standby ({}{}); a failover needs one as its target",
                tv.role,
                tv.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
        let target_lsn = tv.lsn.unwrap_or(0);
        let target_end = WalEnd {
            site: to.to_string(),
            lsn: tv.lsn,
            next_xid: tv.next_xid,
            commits_after_target: None,
            source: "online".into(),
        };
        // Every other member's WAL end: a running standby answers; a stopped member whose
        // host answers is read from its data directory (a stopped standby was not primary
        // and holds nothing its primary did not write); the rest are unknown.
        let mut ends = Vec::new();
        let mut reachable = Vec::new();
        for m in self.members.iter().filter(|m| m.site != to) {
            let v = view(&m.site);
            let answers = v.reachable() || self.host_answers(&host, m.ip);
            if answers {
                reachable.push(m.site.clone());
            }
            let end = match v.role.as_str() {
                "standby" => Some(WalEnd {
                    site: m.site.clone(),
                    lsn: v.lsn,
                    next_xid: v.next_xid,
                    commits_after_target: None,
                    source: "online".into(),
                }),
                _ if answers => {
                    // Fence first: its agent (and PostgreSQL) stop before its WAL is read.
                    self.stop_ha_agent(&m.site)?;
                    if m.data().join("standby.signal").exists() {
                        None
                    } else {
                        let tail = m
                            .wal_tail(target_lsn)
                            .with_context(|| format!("read the WAL of {}", m.site))?;
                        Some(WalEnd {
                            site: m.site.clone(),
                            lsn: Some(tail.last_commit_end.unwrap_or(target_lsn).max(
                                // Commits before the target's end are on the target.
                                target_lsn.min(tail.end_lsn),
                            )),
                            next_xid: None,
                            commits_after_target: Some(tail.commits_after),
                            source: "offline".into(),
                        })
                    }
                }
                _ => Some(WalEnd {
                    site: m.site.clone(),
                    lsn: None,
                    next_xid: None,
                    commits_after_target: None,
                    source: "unreachable".into(),
                }),
            };
            ends.extend(end);
        }
        let exposure = match verdict(&target_end, &ends, accept_data_loss) {
            Verdict::Refused(why) => bail!("{why}"),
            Verdict::Proven => None,
            Verdict::DataLossAccepted(e) => Some(e),
        };
        // Fence everything reachable but the target.
        let mut fenced = Vec::new();
        for site in &reachable {
            self.stop_ha_agent(site)?;
            fenced.push(site.clone());
        }
        // Rebuild consensus on a surviving member, in the target's site if one answers.
        let etcd = self.lab.etcd_members(&self.zone);
        let mut survivors = Vec::new();
        for m in &etcd {
            if self.host_answers(&host, m.ip) {
                survivors.push(m.clone());
            }
        }
        survivors.sort_by_key(|m| m.site != to);
        let keep = survivors
            .first()
            .ok_or_else(|| anyhow!("no etcd member's host answers; nothing to rebuild on"))?
            .clone();
        self.lab.etcd_force_new_cluster(&self.zone, &keep.name)?;
        let reason = match &exposure {
            None => format!(
                "manual failover: {to} holds every acknowledged commit (WAL {} reaches every \
                 other member's)",
                lsn_text(target_lsn)
            ),
            Some(e) => format!(
                "manual failover with accepted data loss: WAL after {} may be lost{}{}{}",
                lsn_text(e.from_lsn),
                e.to_lsn
                    .map(|l| format!(" (up to {})", lsn_text(l)))
                    .unwrap_or_default(),
                e.transactions_at_most
                    .map(|n| format!(", at most {n} transactions"))
                    .unwrap_or_default(),
                if e.unknown.is_empty() {
                    String::new()
                } else {
                    format!("; unknown: {}", e.unknown.join(", "))
                }
            ),
        };
        let order = dczone_ha::decide::ManualFailover {
            to: to.to_string(),
            requested_ms: dczone_ha::agent::unix_ms(),
            reason,
        };
        let (lab, url, tls) = (
            self.lab.name().to_string(),
            keep.client_url(),
            self.etcd_tls.clone(),
        );
        self.in_host(&host, move || async move {
            let store = Store::connect(&lab, &[url], &tls).await?;
            store.put_json(&store.keys.failover(), &order, None).await?;
            store.delete(&store.keys.leader()).await
        })?
        .context("write the failover order to the rebuilt consensus store")?;
        // Only now the other survivors: the order is in place before the old leader key
        // can expire on the rebuilt store (whose replication record may be stale: the
        // survivor need not have applied the last writes its old majority committed).
        let rejoined = self.rejoin_consensus(&host)?;
        let deadline = t0 + timeout;
        let leader_ms = loop {
            if Instant::now() > deadline {
                bail!(
                    "{to} did not take the leader key within {timeout:?}; see `dczone db \
                     status` and {} (last lines: {})",
                    target.dir.join("agent.log").display(),
                    self.agent_log_tail(to)
                );
            }
            if self
                .snapshot(&host)
                .is_ok_and(|s| s.leader.is_some_and(|l| l.site == to))
            {
                break t0.elapsed().as_secs_f64() * 1e3;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let first_commit_ms = operator::first_commit(&self.at(&host), to, t0, deadline)?
            .ok_or_else(|| anyhow!("{to} leads but accepted no commit within {timeout:?}"))?;
        Ok(FailoverReport {
            to: to.to_string(),
            proven: exposure.is_none(),
            target_lsn: lsn_text(target_lsn),
            lost_from_lsn: exposure.as_ref().map(|e| lsn_text(e.from_lsn)),
            lost_to_lsn: exposure.as_ref().and_then(|e| e.to_lsn).map(lsn_text),
            transactions_at_most: exposure.as_ref().and_then(|e| e.transactions_at_most),
            unknown: exposure.map(|e| e.unknown).unwrap_or_default(),
            wal_ends: ends,
            fenced,
            consensus_rebuilt_on: keep.name,
            consensus_rejoined: rejoined,
            leader_ms,
            first_commit_ms,
        })
    }
}

/// One etcd member as the operator's host sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ConsensusMemberView {
    pub name: String,
    pub site: String,
    pub url: String,
    pub reachable: bool,
    /// It answers and follows a raft leader.
    pub has_leader: bool,
    pub error: Option<String>,
}

/// `db status` when the consensus store cannot be read: which members do not answer, and
/// what every PostgreSQL member says about itself.
#[derive(Debug, Clone, Serialize)]
pub struct DegradedStatus {
    pub error: String,
    pub consensus_quorum: bool,
    pub consensus: Vec<ConsensusMemberView>,
    pub unreachable_consensus_members: Vec<String>,
    pub members: Vec<dczone_db::DirectView>,
}

impl Database {
    /// Every etcd member asked alone, and every PostgreSQL member read directly, from `host`.
    pub fn degraded_status(&self, host: &str, error: String) -> anyhow::Result<DegradedStatus> {
        let etcd: Vec<(String, String, String)> = self
            .lab
            .etcd_members(&self.zone)
            .iter()
            .map(|m| (m.name.clone(), m.site.clone(), m.client_url()))
            .collect();
        let members = self.members.clone();
        let tls = self.etcd_tls.clone();
        let (consensus, direct) = self.in_host(host, move || async move {
            let tls = &tls;
            let asks = etcd.into_iter().map(|(name, site, url)| async move {
                let r = Store::member_status(&url, tls).await;
                ConsensusMemberView {
                    name,
                    site,
                    url,
                    reachable: r.is_ok(),
                    has_leader: r.as_ref().is_ok_and(|s| s.raft_leader != 0),
                    error: r.err().map(|e| e.to_string()),
                }
            });
            let reads = members
                .iter()
                .map(|m| dczone_db::direct_view(m, Duration::from_millis(700)));
            tokio::join!(
                futures_util::future::join_all(asks),
                futures_util::future::join_all(reads)
            )
        })?;
        let with_leader = consensus.iter().filter(|c| c.has_leader).count();
        Ok(DegradedStatus {
            error,
            consensus_quorum: with_leader > consensus.len() / 2,
            unreachable_consensus_members: consensus
                .iter()
                .filter(|c| !c.reachable)
                .map(|c| format!("{} ({})", c.name, c.site))
                .collect(),
            consensus,
            members: direct,
        })
    }
}
