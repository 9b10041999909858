//! The database platform as an operator with an access bundle reaches it (`dczone --access
//! DIR db ...`): the platform's state and switchover requests go to a member host's agent,
//! which asks its HA agent (the only holder of etcd credentials); the ledger's clients,
//! the first-commit probe and the audit connect to PostgreSQL directly with the bundle's
//! `pgpass` and `ca.crt`. The audit logs are the operator's own, in `<bundle>/db/`.

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

use dczone_agent::access::{Access, BundleDatabase};
use dczone_agent::CallError;
use dczone_ha::decide::Switchover;
use dczone_ha::keys::Snapshot;
use dczone_ledger::{LoadOptions, LoadResult};

use crate::operator::{self, on_own_runtime, AuditLog, Reach};

/// An agent refused the request itself (400, 403, 409: a wrong request or certificate):
/// asking again, or another agent, gets the same answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// How long one member's agent may take to answer (its HA agent waits up to 10 s for etcd).
const CALL_TIMEOUT: Duration = Duration::from_secs(12);

/// The platform of a zone, through its agents.
#[derive(Debug, Clone)]
pub struct Remote {
    pub access: Access,
    pub plan: BundleDatabase,
}

impl Remote {
    pub fn open(access: &Access) -> anyhow::Result<Remote> {
        let plan = access.bundle.database.clone().ok_or_else(|| {
            anyhow!(
                "the access bundle {} describes no database ([database] in zone.toml); the \
                 zone has none, or the bundle predates it: take a fresh one from `dczone lab up`",
                access.dir.display()
            )
        })?;
        Ok(Remote {
            access: access.clone(),
            plan,
        })
    }

    /// The database's password must be where libpq looks (`PGPASSFILE`; `dczone` points it
    /// at the bundle's `pgpass` unless the operator set it): without it every member
    /// refuses the clients, and the error should say so before any of them tries.
    pub fn require_password(&self) -> anyhow::Result<()> {
        if dczone_db::client_password().is_some() {
            return Ok(());
        }
        let file = self.passfile();
        Err(anyhow!(
            "no database password in {}: `dczone --access DIR db up` fetches it from a member's \
             agent into DIR/pgpass (mode 0600; the lab's bundle gets it from `db up`), or set \
             PGPASSFILE",
            file.display()
        ))
    }

    /// The operator's audit logs, beside the bundle.
    pub fn audit_log(&self) -> AuditLog {
        AuditLog::new(&self.access.dir.join("db"))
    }

    /// Asks the members' hosts' agents in turn until one answers: a member whose site is
    /// cut off cannot reach an etcd quorum, another can. An agent's refusal of the request
    /// itself ([`Refused`]) ends it.
    fn ask(&self, method: &str, what: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut failures = Vec::new();
        for m in &self.plan.members {
            let client = self.access.client(&m.host)?;
            let path = format!("/v1/db/{}/{what}", m.site);
            match client.call(method, &path, body.clone(), CALL_TIMEOUT) {
                Ok(v) => return Ok(v),
                // A wrong request or certificate is wrong everywhere: no point asking on.
                Err(CallError::Refused {
                    code: 400 | 403 | 409,
                    message,
                }) => return Err(Refused(message).into()),
                Err(e) => failures.push(format!("{} (on {}): {e}", m.site, m.host)),
            }
        }
        Err(anyhow!(
            "no database member's agent could answer: {}",
            failures.join("; ")
        ))
    }

    /// Brings the platform up through the agents (idempotent); returns the primary's site.
    /// Each member's host agent starts its HA agent (which readies the member and runs its
    /// PostgreSQL); the platform's password comes from a member's agent into the bundle
    /// (`pgpass`, 0600) unless libpq already has one; then the ledger, once a primary
    /// leads, and the wait for every standby and the tier's replication mode. The zone's
    /// etcd members start first, through their hosts' agents.
    pub fn up(&self, timeout: Duration) -> anyhow::Result<String> {
        // etcd first: its members start through their hosts' agents; after a manual
        // failover rebuilt it on survivors, those that are back rejoin it.
        crate::recovery::consensus_up(self, timeout)?;
        crate::recovery::rejoin_consensus(self)?;
        // Every member's host is asked: one cut off must not keep the others down.
        let mut failures = Vec::new();
        // Every member gets the same password before its HA agent starts (the platform's
        // if a member has it, else the operator's, else a new one); a member that holds
        // another keeps it (409), and `fetch_password` then brings the platform's here.
        // A member that has one already (a platform that exists) gives it: members with
        // two passwords could not replicate.
        let existing = || {
            let v = self.ask("GET", "credentials", None).ok()?;
            dczone_db::password_in(v["pgpass"].as_str()?)
        };
        let password = match existing().or_else(dczone_db::client_password) {
            Some(p) => p,
            None => dczone_db::random_password()?,
        };
        let body = serde_json::json!({ "pgpass": format!("*:*:*:postgres:{password}\n") });
        for m in &self.plan.members {
            let client = self.access.client(&m.host)?;
            let put = client.call(
                "PUT",
                &format!("/v1/db/{}/credentials", m.site),
                Some(body.clone()),
                CALL_TIMEOUT,
            );
            let started = match put {
                Ok(_) | Err(CallError::Refused { code: 409, .. }) => client
                    .call(
                        "POST",
                        &format!("/v1/db/{}/ha-agent", m.site),
                        None,
                        CALL_TIMEOUT,
                    )
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = started {
                failures.push(format!("{} (on {}): {e}", m.site, m.host));
            }
        }
        if failures.len() == self.plan.members.len() {
            bail!("no HA agent could be started: {}", failures.join("; "));
        }
        for f in &failures {
            eprintln!("warning: the HA agent of {f}; the platform comes up without it");
        }
        self.fetch_password(timeout)?;
        let sites: Vec<String> = self.plan.members.iter().map(|m| m.site.clone()).collect();
        let not_ready = |why: String| {
            anyhow!(
                "the database platform is not ready after {} s: {why}; the members' HA agents \
                 log to <db dir>/SITE/agent.log on their hosts",
                timeout.as_secs()
            )
        };
        operator::wait_streaming(self, &[], timeout)?.map_err(not_ready)?;
        operator::create_ledger(self, timeout)?;
        let primary = operator::wait_streaming(self, &sites, timeout)?.map_err(not_ready)?;
        // The zone file's tier, unless `db policy` set another at run time (whose mode
        // the bundle does not know).
        let tier_now = self.snapshot().ok().and_then(|s| s.tier);
        if let Some(mode) = self.plan.replication {
            if tier_now.is_none_or(|t| t == self.plan.tier) {
                operator::wait_mode(self, mode, timeout)?;
            }
        }
        Ok(primary)
    }

    /// Where this process's libpq clients read the password: `PGPASSFILE` (which `dczone`
    /// points at the bundle's `pgpass` unless the operator set it).
    fn passfile(&self) -> std::path::PathBuf {
        std::env::var_os("PGPASSFILE")
            .map_or_else(|| self.access.dir.join("pgpass"), std::path::PathBuf::from)
    }

    /// Writes the platform's password where this process's clients read it, from the
    /// first member's agent that has it (a starting HA agent makes it within moments).
    ///
    /// A password already there is kept if it is the platform's; a stale one (another
    /// platform's, before this one was rebuilt) is replaced in the bundle, and refused if
    /// the operator's own `PGPASSFILE` holds it, since libpq would fail with it.
    fn fetch_password(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let v = loop {
            // 404 until a starting HA agent has made it; a refusal (403) is final.
            match self.ask("GET", "credentials", None) {
                Ok(v) => break v,
                Err(e)
                    if e.downcast_ref::<Refused>().is_none()
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => return Err(e.context("fetch the database password from the agents")),
            }
        };
        let text = v["pgpass"]
            .as_str()
            .filter(|t| dczone_db::password_in(t).is_some())
            .ok_or_else(|| anyhow!("fetch the database password: unreadable answer"))?;
        let file = self.passfile();
        let platform = dczone_db::password_in(text);
        if dczone_db::client_password() == platform {
            return Ok(());
        }
        // Only the bundle's own file is ever written; an operator's own is theirs.
        if file != self.access.dir.join("pgpass") {
            bail!(
                "PGPASSFILE ({}) holds no line for user postgres with the database platform's \
                 password: add the line from a member host's <db dir>/pgpass, or unset \
                 PGPASSFILE to use the bundle's ({})",
                file.display(),
                self.access.dir.join("pgpass").display()
            );
        }
        let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
        dczone_db::write_private(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &file).with_context(|| format!("create {}", file.display()))?;
        Ok(())
    }

    /// Switches the replication policy to `tier` (validated by the HA agent against the
    /// zone's tiers); the primary applies it within one HA loop.
    pub fn set_policy(&self, tier: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({ "tier": tier });
        self.ask("PUT", "policy", Some(body))
            .context("set the policy through the agents")?;
        Ok(())
    }

    /// A libpq connection string that reaches whichever member accepts writes.
    pub fn conninfo(&self) -> String {
        crate::conninfo_for(&self.hosts())
    }

    /// Runs the ledger's workload from this process.
    pub fn load(&self, opts: LoadOptions) -> anyhow::Result<LoadResult> {
        self.in_client(move || dczone_ledger::run(opts))
    }
}

impl Reach for Remote {
    fn members(&self) -> Vec<(String, Ipv4Addr)> {
        self.plan
            .members
            .iter()
            .map(|m| (m.site.clone(), m.address))
            .collect()
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let v = self
            .ask("GET", "state", None)
            .context("read the platform's state through the agents")?;
        serde_json::from_value(v).context("read the platform's state: unreadable answer")
    }

    fn request_switchover(&self, request: &Switchover) -> anyhow::Result<()> {
        // The HA agent stamps it with its own clock; the rest is the primary's to set.
        let body = serde_json::json!({ "from": request.from, "to": request.to });
        self.ask("POST", "switchover", Some(body))
            .context("file the switchover through the agents")?;
        Ok(())
    }

    fn clear_switchover(&self) -> anyhow::Result<()> {
        self.ask("DELETE", "switchover", None)
            .context("withdraw the switchover through the agents")?;
        Ok(())
    }

    fn in_client<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        on_own_runtime(f)
    }
}

impl crate::recovery::Hosts for Remote {
    fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.access
            .client(host)?
            .call(method, path, body, timeout)
            .map_err(|e| anyhow!("{host}'s agent: {e}"))
    }

    fn member_hosts(&self) -> Vec<(String, String)> {
        self.plan
            .members
            .iter()
            .map(|m| (m.site.clone(), m.host.clone()))
            .collect()
    }

    fn consensus_hosts(&self) -> Vec<(String, String)> {
        self.plan
            .consensus
            .iter()
            .map(|h| {
                let site = self
                    .access
                    .bundle
                    .hosts
                    .iter()
                    .find(|x| x.id == *h)
                    .map(|x| x.site.clone())
                    .unwrap_or_default();
                (h.clone(), site)
            })
            .collect()
    }

    fn direct_views(&self) -> anyhow::Result<Vec<dczone_db::DirectView>> {
        let members: Vec<dczone_db::Member> = self
            .plan
            .members
            .iter()
            .map(|m| dczone_db::Member {
                app: dczone_db::app_name(&m.site),
                site: m.site.clone(),
                host: m.host.clone(),
                namespace: String::new(),
                ip: m.address,
                dir: std::path::PathBuf::new(),
                passfile: self.passfile(),
                ca: self.access.dir.join("ca.crt"),
            })
            .collect();
        on_own_runtime(move || async move {
            let reads = members
                .iter()
                .map(|m| dczone_db::direct_view(m, Duration::from_millis(700)));
            futures_util::future::join_all(reads).await
        })
    }
}
