//! The operator's storage commands (`storage up|status|down`), through the hosts' agents
//! wherever the operator stands ([`Agents`]: the lab's, or an access bundle's). The agents'
//! routes and their bodies:
//!
//! | route | body | answer |
//! |---|---|---|
//! | `PUT /v1/storage/C` | [`InstallBody`] | [`host::Installed`] |
//! | `GET /v1/storage/C` | | [`HostView`] |
//! | `POST /v1/storage/C/start` | [`StartBody`] | names started |
//! | `POST /v1/storage/C/stop` | [`StopBody`] | names stopped |
//! | `POST /v1/storage/C/setup` | | steps done (a monitor's host) |
//! | `GET /v1/storage/C/status` | | [`ClusterStatus`] (a monitor's host) |
//! | `DELETE /v1/storage/C` | | names stopped; files removed |

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use dczone_zone::Zone;

use crate::host::{self, DaemonState};
use crate::keys::Keys;
use crate::plan::{self, ClusterPlan, Kind};
use crate::ClusterStatus;

/// How an operator's command reaches the hosts' agents.
pub trait Agents: Sync {
    fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value>;
}

/// Body of `PUT /v1/storage/C`: the plan, the keys the host needs, and (for a monitor's
/// host other than the first) the monitors' initial map.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallBody {
    pub plan: ClusterPlan,
    pub keys: Keys,
    #[serde(default)]
    pub monmap: Option<String>,
}

/// Body of `POST /v1/storage/C/start`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    pub kinds: Vec<Kind>,
}

/// Body of `POST /v1/storage/C/stop`: one daemon (`osd.2`), or all of the host's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    #[serde(default)]
    pub daemon: Option<String>,
}

/// Body of `POST /v1/storage/C/setup`: everything, or only the monitors' sites.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupBody {
    #[serde(default)]
    pub monitors_only: bool,
}

/// What one host holds of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    pub host: String,
    pub fsid: Option<String>,
    pub daemons: Vec<DaemonState>,
}

/// What `storage up` did for one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct UpReport {
    pub cluster: String,
    pub fsid: String,
    /// Made now (else it was there, and only stopped daemons were started).
    pub created: bool,
    pub started: Vec<String>,
    pub setup: Vec<String>,
    pub ms: f64,
    pub status: ClusterStatus,
}

const CALL: Duration = Duration::from_secs(60);
/// An OSD's creation (registration, bluestore mkfs) takes a few seconds per OSD.
const START_CALL: Duration = Duration::from_secs(240);

fn path(cluster: &str, rest: &str) -> String {
    format!("/v1/storage/{cluster}{rest}")
}

/// Calls every host of `hosts` at once; their answers in order.
fn on_each<T: Send>(
    hosts: &[String],
    f: impl Fn(&str) -> anyhow::Result<T> + Sync,
) -> Vec<(String, anyhow::Result<T>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| {
                let f = &f;
                (h.clone(), s.spawn(move || f(h)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(h, j)| {
                let r = j.join().unwrap_or_else(|_| Err(anyhow!("panicked")));
                (h, r)
            })
            .collect()
    })
}

fn all_ok<T>(what: &str, results: Vec<(String, anyhow::Result<T>)>) -> anyhow::Result<Vec<T>> {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (h, r) in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => failed.push(format!("{h}: {e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("{what}: {}", failed.join("; "));
    }
    Ok(ok)
}

/// The cluster's status, asked of its monitors' hosts in turn until one answers.
pub fn cluster_status(agents: &impl Agents, plan: &ClusterPlan) -> anyhow::Result<ClusterStatus> {
    let mut failures = Vec::new();
    for h in plan.admin_hosts() {
        match agents.call(&h, "GET", &path(&plan.name, "/status"), None, CALL) {
            Ok(v) => return serde_json::from_value(v).context("an unreadable cluster status"),
            Err(e) => failures.push(format!("{h}: {e:#}")),
        }
    }
    bail!(
        "no monitor's host of cluster {} answered: {}",
        plan.name,
        failures.join("; ")
    )
}

fn wait_for(
    agents: &impl Agents,
    plan: &ClusterPlan,
    what: &str,
    within: Duration,
    done: impl Fn(&ClusterStatus) -> bool,
) -> anyhow::Result<ClusterStatus> {
    let t = Instant::now();
    let mut last = String::from("no answer yet");
    while t.elapsed() < within {
        match cluster_status(agents, plan) {
            Ok(s) if done(&s) => return Ok(s),
            Ok(s) => {
                last = format!(
                    "{}; quorum {}/{}, OSDs up {}/{}, PGs {:?}",
                    s.health,
                    s.quorum.len(),
                    s.mons,
                    s.osds_up,
                    s.osds,
                    s.pg_states
                )
            }
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!(
        "cluster {}: {what} did not happen within {} s (last: {last})",
        plan.name,
        within.as_secs()
    )
}

/// Brings one cluster up: installs it where it is not (a new fsid and keys when no host
/// holds it), starts its daemons that do not run, sets it up, and waits until every PG is
/// active. `progress` gets a line per step.
pub fn up_cluster(
    agents: &impl Agents,
    mut plan: ClusterPlan,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<UpReport> {
    let t = Instant::now();
    let hosts = plan.hosts();
    let views = all_ok(
        &format!("ask the hosts of cluster {}", plan.name),
        on_each(&hosts, |h| {
            let v = agents.call(h, "GET", &path(&plan.name, ""), None, CALL)?;
            Ok(serde_json::from_value::<HostView>(v)?)
        }),
    )?;
    let fsids: Vec<Option<String>> = views.iter().map(|v| v.fsid.clone()).collect();
    let created = fsids.iter().all(Option::is_none);
    if created {
        plan.fsid = host::new_fsid()?;
        progress(&format!("{}: new cluster {}", plan.name, plan.fsid));
        let keys = Keys::generate(&plan)?;
        let admin = plan.admin_hosts();
        let first = &admin[0];
        let body = |h: &str, monmap: Option<String>| {
            serde_json::to_value(InstallBody {
                plan: plan.clone(),
                keys: keys.for_host(&plan, h),
                monmap,
            })
            .expect("serializes")
        };
        let v = agents
            .call(
                first,
                "PUT",
                &path(&plan.name, ""),
                Some(body(first, None)),
                CALL,
            )
            .with_context(|| format!("install cluster {} on {first}", plan.name))?;
        let installed: host::Installed = serde_json::from_value(v)?;
        let monmap = installed.monmap;
        let others: Vec<String> = hosts.iter().filter(|h| *h != first).cloned().collect();
        all_ok(
            &format!("install cluster {}", plan.name),
            on_each(&others, |h| {
                agents.call(
                    h,
                    "PUT",
                    &path(&plan.name, ""),
                    Some(body(h, monmap.clone())),
                    CALL,
                )
            }),
        )?;
    } else {
        let first = fsids.iter().flatten().next().expect("one").clone();
        let missing: Vec<&str> = views
            .iter()
            .filter(|v| v.fsid.as_deref() != Some(first.as_str()))
            .map(|v| v.host.as_str())
            .collect();
        if !missing.is_empty() {
            bail!(
                "cluster {} ({first}) is not installed alike on {}: `dczone storage down` \
                 removes it everywhere, then `storage up` makes it anew",
                plan.name,
                missing.join(", ")
            );
        }
        plan.fsid = first;
    }
    let start = |kinds: &[Kind], on: &[String]| -> anyhow::Result<Vec<String>> {
        let body = serde_json::to_value(StartBody {
            kinds: kinds.to_vec(),
        })
        .expect("serializes");
        let started = all_ok(
            &format!("start the daemons of cluster {}", plan.name),
            on_each(on, |h| {
                let v = agents.call(
                    h,
                    "POST",
                    &path(&plan.name, "/start"),
                    Some(body.clone()),
                    START_CALL,
                )?;
                Ok(serde_json::from_value::<Vec<String>>(v)?)
            }),
        )?;
        Ok(started.into_iter().flatten().collect())
    };
    let mon_hosts: Vec<String> = plan.admin_hosts();
    if !created {
        // A cluster that runs whole, set up and active, needs nothing more.
        let all_run = views
            .iter()
            .all(|v| !v.daemons.is_empty() && v.daemons.iter().all(|d| d.running));
        if all_run {
            if let Ok(status) = cluster_status(agents, &plan) {
                if status.all_active()
                    && status.mgr_available
                    && status.stretch_mode == plan.stretch.is_some()
                    && status.osds_up == plan.osds.len() as u64
                    // Every site's pool made (a cluster set up before the per-site pools
                    // gets its second one now).
                    && status.pgs
                        >= u64::from(plan.pool.pg_num) * plan.site_pools().len() as u64
                {
                    progress(&format!("{}: runs ({})", plan.name, status.health));
                    return Ok(UpReport {
                        cluster: plan.name.clone(),
                        fsid: plan.fsid.clone(),
                        created,
                        started: Vec::new(),
                        setup: Vec::new(),
                        ms: t.elapsed().as_secs_f64() * 1e3,
                        status,
                    });
                }
            }
        }
    }
    let mut started = start(&[Kind::Mon], &mon_hosts)?;
    progress(&format!(
        "{}: monitors started, waiting for their quorum",
        plan.name
    ));
    let n_mons = plan.mons.len();
    wait_for(
        agents,
        &plan,
        "a quorum of every monitor",
        Duration::from_secs(120),
        |s| s.quorum.len() == n_mons,
    )?;
    progress(&format!(
        "{}: quorum; creating and starting managers and OSDs",
        plan.name
    ));
    let admin = &mon_hosts[0];
    // (Locating the monitors while the OSDs are made was tried: each location is a
    // monitor election, which holds up every OSD's registration; no faster, and the
    // monitors logged slow ops.)
    started.extend(start(&[Kind::Mgr, Kind::Osd], &hosts)?);
    let n_osds = plan.osds.len() as u64;
    wait_for(
        agents,
        &plan,
        "every OSD up",
        Duration::from_secs(180),
        |s| s.osds == n_osds && s.osds_up == n_osds,
    )?;
    progress(&format!("{}: OSDs up; pools and CRUSH rules", plan.name));
    let v = agents
        .call(
            admin,
            "POST",
            &path(&plan.name, "/setup"),
            Some(json!({})),
            START_CALL,
        )
        .with_context(|| format!("set up cluster {} on {admin}", plan.name))?;
    let setup: Vec<String> = serde_json::from_value(v)?;
    let status = wait_for(
        agents,
        &plan,
        "every PG active",
        Duration::from_secs(180),
        |s| s.all_active() && s.mgr_available,
    )?;
    progress(&format!("{}: {}", plan.name, status.health));
    Ok(UpReport {
        cluster: plan.name.clone(),
        fsid: plan.fsid.clone(),
        created,
        started,
        setup,
        ms: t.elapsed().as_secs_f64() * 1e3,
        status,
    })
}

/// `storage up`: every cluster of the zone, at once.
pub fn up(
    agents: &impl Agents,
    zone: &Zone,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Vec<UpReport>> {
    let clusters = plan::clusters(zone);
    if clusters.is_empty() {
        bail!("zone {} has no data-center site, so no storage", zone.name);
    }
    let results: Vec<anyhow::Result<UpReport>> = std::thread::scope(|s| {
        let handles: Vec<_> = clusters
            .into_iter()
            .map(|c| s.spawn(move || up_cluster(agents, c, progress)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("panicked"))))
            .collect()
    });
    results.into_iter().collect()
}

/// One cluster's status, or why it could not be read.
#[derive(Debug, Clone, Serialize)]
pub struct StatusLine {
    pub cluster: String,
    pub sites: Vec<String>,
    pub status: Option<ClusterStatus>,
    pub error: Option<String>,
}

/// `storage status`.
pub fn status(agents: &impl Agents, zone: &Zone) -> Vec<StatusLine> {
    plan::clusters(zone)
        .into_iter()
        .map(|c| {
            let r = cluster_status(agents, &c);
            StatusLine {
                cluster: c.name.clone(),
                sites: c.sites.clone(),
                error: r.as_ref().err().map(|e| format!("{e:#}")),
                status: r.ok(),
            }
        })
        .collect()
}

/// What `storage down` did on one host.
#[derive(Debug, Clone, Serialize)]
pub struct DownLine {
    pub cluster: String,
    pub host: String,
    pub stopped: Vec<String>,
    /// The host's agent did not answer: its files stay (`lab down` removes a lab's).
    pub error: Option<String>,
}

/// `storage down`: stops every daemon and removes every cluster's files, host by host.
pub fn down(agents: &impl Agents, zone: &Zone) -> Vec<DownLine> {
    let mut lines = Vec::new();
    for c in plan::clusters(zone) {
        for (host, r) in on_each(&c.hosts(), |h| {
            let v = agents.call(h, "DELETE", &path(&c.name, ""), None, CALL)?;
            Ok(serde_json::from_value::<Vec<String>>(v)?)
        }) {
            lines.push(DownLine {
                cluster: c.name.clone(),
                host,
                stopped: r.as_ref().cloned().unwrap_or_default(),
                error: r.err().map(|e| format!("{e:#}")),
            });
        }
    }
    lines
}

/// Stops one daemon (`osd.2`) of a cluster on its host: a fault for tests and
/// benchmarks (a daemon's loss). Returns the host.
pub fn stop_daemon(
    agents: &impl Agents,
    zone: &Zone,
    cluster: &str,
    daemon: &str,
) -> anyhow::Result<String> {
    let c = plan::clusters(zone)
        .into_iter()
        .find(|c| c.name == cluster)
        .ok_or_else(|| anyhow!("the zone has no storage cluster {cluster}"))?;
    let (kind, id) = daemon
        .split_once('.')
        .ok_or_else(|| anyhow!("a daemon is named KIND.ID, e.g. osd.2 (got {daemon})"))?;
    let kind = match kind {
        "mon" => Kind::Mon,
        "mgr" => Kind::Mgr,
        "osd" => Kind::Osd,
        k => bail!("no daemon kind {k}: mon, mgr or osd"),
    };
    let host = c
        .hosts()
        .into_iter()
        .find(|h| c.on_host(kind, h).iter().any(|p| p.id == id))
        .ok_or_else(|| anyhow!("cluster {cluster} has no {daemon}"))?;
    let body = serde_json::to_value(StopBody {
        daemon: Some(daemon.into()),
    })
    .expect("serializes");
    agents.call(&host, "POST", &path(cluster, "/stop"), Some(body), CALL)?;
    Ok(host)
}
