//! The disaster the reference is written for. Region 1 (both
//! DC1 sites) is cut off at a random moment under Tier 1 load from a client outside it
//! (DC2.1), while a second client inside region 1 keeps trying to write to whatever it can
//! still reach there. Each injection then:
//!
//! 1. audits every transaction acknowledged to either client (present exactly once on the
//!    new primary, balances conserved);
//! 2. checks for split brain: a write acknowledged inside region 1 after the new primary's
//!    first acknowledged write (both clients stamp acknowledgements on the same clock);
//! 3. restores region 1 and waits until both DC1 members stream again (rejoin);
//! 4. switches the primary back home (`db switchover`), also audited by the next round.
//!
//! RTO is measured twice: `rto_ms` from the cut to the first commit the outside client sees
//! acknowledged (what a bank sees), and `leader_ms` to the failover entry in the HA audit log
//! (what the platform controls).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use dczone_lab::Lab;
use dczone_ledger::unix_us;
use dczone_zone::database::Replication;

use dczone_database::Database;

use crate::inter_region::{first_ack_after, fresh_platform, load_opts, Conditions, NetworkOptions};
use crate::{Header, Observer};

/// The reference's regional disaster: every database site of this region is cut off.
const LOST_REGION: &str = "region-1";
/// The outside client's host (DC2.1, not its database host) and the inside client's.
const OUTSIDE_CLIENT: &str = "dc2.1-h2";
const INSIDE_CLIENT: &str = "dc1.1-client";
/// Acknowledgements this close after the cut were already in flight.
const IN_FLIGHT_US: u64 = 50_000;

#[derive(Debug, Clone)]
pub struct RegionDisasterOptions {
    pub injections: usize,
    pub clients: usize,
    pub network: NetworkOptions,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegionInjection {
    pub old_primary: String,
    pub new_primary: String,
    pub injected_after_ms: f64,
    /// Cut to the first commit acknowledged to the outside client.
    pub rto_ms: Option<f64>,
    /// Cut to the new primary taking the leader key (the HA audit log's failover entry).
    pub leader_ms: Option<f64>,
    pub acknowledged: usize,
    /// Acknowledged to the client inside region 1 (before the cut, or split brain).
    pub inside_acknowledged: usize,
    /// Last acknowledgement inside region 1, from the cut (negative: before it).
    pub inside_last_ack_ms: Option<f64>,
    pub lost: usize,
    pub indeterminate: usize,
    pub indeterminate_applied: usize,
    pub balances_conserved: bool,
    pub split_brain: bool,
    /// Restore to both region-1 members streaming again.
    pub rejoin_ms: f64,
    /// The planned switchover back home, to the first commit there.
    pub switch_back_ms: f64,
}

/// What the consensus placement costs the primary (in DC1.1), with etcd's raft leadership
/// at one place.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementCost {
    pub raft_leader_at: String,
    pub lease_renew_ms_p50: f64,
    pub lease_renew_ms_p99: f64,
    pub leader_write_ms_p50: f64,
    pub leader_write_ms_p99: f64,
}

#[derive(Debug, Serialize)]
pub struct RegionDisasterReport {
    #[serde(flatten)]
    pub header: Header,
    pub network: NetworkOptions,
    pub cross_traffic: Option<dczone_lab::cross::CrossReport>,
    pub clients: usize,
    pub injections: Vec<RegionInjection>,
    /// Worst client-observed RTO.
    pub region_rto_ms: Option<f64>,
    pub region_rto_median_ms: Option<f64>,
    pub region_rto_p95_ms: Option<f64>,
    pub leader_ms_median: Option<f64>,
    pub rpo_lost_transactions: usize,
    pub indeterminate_transactions: usize,
    /// Worst rejoin.
    pub rejoin_ms: f64,
    pub split_brain: bool,
    pub rto_pass: bool,
    pub kr2_1_pass: bool,
    /// Lease renewal and leader-key write latency from DC1.1, raft leadership at the
    /// witness (what the agents keep) and at DC1.1 (the placement before the witness).
    pub placement_cost: Vec<PlacementCost>,
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[i])
}

/// The sites of the lost region that hold database members.
fn region_sites(p: &Database) -> Vec<String> {
    p.zone
        .sites
        .iter()
        .filter(|s| s.region == LOST_REGION && p.plan.members().contains(&s.id))
        .map(|s| s.id.clone())
        .collect()
}

/// Measures [`PlacementCost`] from the primary's home host, on an idle store (the HA
/// agents stopped, so that none moves raft leadership back while it runs).
fn placement_cost(p: &Database) -> anyhow::Result<Vec<PlacementCost>> {
    p.down()?;
    let home = p.member(&p.plan.primary)?.clone();
    let etcd = p.lab.etcd_members(&p.zone);
    let own: Vec<String> = etcd
        .iter()
        .filter(|m| m.site == home.site)
        .map(|m| m.client_url())
        .collect();
    let mut places: Vec<(String, Vec<String>)> = etcd
        .iter()
        .filter(|m| {
            p.zone
                .site_index(&m.site)
                .is_some_and(|i| p.zone.sites[i].kind == dczone_zone::SiteKind::Witness)
        })
        .map(|m| (format!("witness ({})", m.name), vec![m.client_url()]))
        .collect();
    places.push((format!("{} (primary's site)", home.site), own.clone()));
    let mut out = Vec::new();
    // As the primary's HA agent calls etcd: with its host's consensus certificate.
    let id = p.lab.consensus_identity(&home.host, Some(home.ip))?;
    let creds = dczone_ha::keys::Credentials {
        ca: id.ca,
        cert: id.certificate,
        key: id.key,
    };
    for (name, urls) in places {
        let (lab, own, tls) = (p.lab.name().to_string(), own.clone(), creds.clone());
        let (renew, write) = p
            .in_host(&home.host, move || async move {
                let store = dczone_ha::keys::Store::connect(&lab, &own, &tls).await?;
                store.move_etcd_leadership_to(&urls).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                store.call_latency(200).await
            })?
            .context("measure etcd call latency")?;
        let q = |v: &[f64], x: f64| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            percentile(&v, x).unwrap_or(0.0)
        };
        out.push(PlacementCost {
            raft_leader_at: name,
            lease_renew_ms_p50: q(&renew, 0.5),
            lease_renew_ms_p99: q(&renew, 0.99),
            leader_write_ms_p50: q(&write, 0.5),
            leader_write_ms_p99: q(&write, 0.99),
        });
    }
    Ok(out)
}

fn one(
    p: &Database,
    exe: &Path,
    state_dir: &Path,
    o: &RegionDisasterOptions,
    after: Duration,
) -> anyhow::Result<RegionInjection> {
    let home = p.plan.primary.clone();
    let sites = region_sites(p);
    let snap = p.wait_mode(
        OUTSIDE_CLIENT,
        p.plan.policy().replication,
        Duration::from_secs(60),
    )?;
    let old = snap
        .leader
        .map(|l| l.site)
        .ok_or_else(|| anyhow!("no primary before the disaster"))?;
    if !sites.contains(&old) {
        bail!("the primary is {old}, outside {LOST_REGION}; switch it home first");
    }
    let seconds = after.as_secs_f64() + 14.0;
    // The inside client writes to whatever it reaches in region 1: any acknowledgement
    // there after the new primary's first is split brain.
    let inside = {
        let pc = p.clone();
        let opts = load_opts(p, INSIDE_CLIENT, 1, seconds);
        std::thread::spawn(move || pc.load(INSIDE_CLIENT, opts))
    };
    let outside = {
        let pc = p.clone();
        let opts = load_opts(p, OUTSIDE_CLIENT, o.clients, seconds);
        std::thread::spawn(move || pc.load(OUTSIDE_CLIENT, opts))
    };
    std::thread::sleep(after);
    let t0 = unix_us();
    for s in &sites {
        p.lab.site_isolate(s, true)?;
    }
    let join = |h: std::thread::JoinHandle<anyhow::Result<dczone_ledger::LoadResult>>| {
        h.join()
            .map_err(|_| anyhow!("a load thread panicked"))
            .and_then(|r| r)
    };
    let out = join(outside)?;
    let ins = join(inside)?;
    p.record(&out)?;
    p.record(&ins)?;
    let mut acked = out.acknowledged.clone();
    acked.extend(ins.acknowledged.iter().cloned());
    let mut ind = out.indeterminate.clone();
    ind.extend(ins.indeterminate.iter().cloned());
    let audit = p.audit(OUTSIDE_CLIENT, acked, ind)?;
    let snap = p.snapshot(OUTSIDE_CLIENT)?;
    let new = snap
        .leader
        .as_ref()
        .map(|l| l.site.clone())
        .unwrap_or_else(|| "none".into());
    let leader_ms = snap
        .audit
        .iter()
        .filter(|e| e.kind == "failover" && e.start_ms * 1000 >= t0)
        .map(|e| (e.start_ms * 1000 - t0) as f64 / 1000.0)
        .reduce(f64::min);
    let rto_ms = first_ack_after(&out, t0, IN_FLIGHT_US);
    let first_new = out
        .ack_times_us
        .iter()
        .copied()
        .filter(|&x| x > t0 + IN_FLIGHT_US)
        .min();
    let inside_last = ins.ack_times_us.iter().copied().max();
    let split_brain = match (first_new, inside_last) {
        (Some(n), Some(i)) => i > n,
        _ => false,
    };

    // Region 1 returns: its old primary was fenced and rejoins as a standby.
    let t1 = Instant::now();
    for s in &sites {
        p.lab.site_isolate(s, false)?;
    }
    let deadline = t1 + Duration::from_secs(90);
    let rejoin_ms = loop {
        let back = p.snapshot(OUTSIDE_CLIENT).is_ok_and(|s| {
            sites.iter().all(|site| {
                s.members
                    .iter()
                    .any(|m| &m.site == site && m.pg_up && m.in_recovery && !m.fenced)
            })
        });
        if back {
            break t1.elapsed().as_secs_f64() * 1e3;
        }
        if Instant::now() > deadline {
            // `db up` restarts whatever did not come back by itself.
            dczone_control::db_up(
                p,
                exe,
                state_dir,
                OUTSIDE_CLIENT,
                crate::inter_region::UP_TIMEOUT,
            )
            .with_context(|| "region 1 did not rejoin within 90 s".to_string())?;
            break t1.elapsed().as_secs_f64() * 1e3;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Home again: a planned switchover back (after the standbys are back in sync).
    p.wait_mode(
        OUTSIDE_CLIENT,
        p.plan.policy().replication,
        Duration::from_secs(60),
    )?;
    let switch_back_ms = if new != home && new != "none" {
        p.switchover(&home, Duration::from_secs(60))
            .context("the switchover back home")?
            .first_commit_ms
    } else {
        0.0
    };
    Ok(RegionInjection {
        old_primary: old,
        new_primary: new,
        injected_after_ms: after.as_secs_f64() * 1e3,
        rto_ms,
        leader_ms,
        acknowledged: out.acknowledged.len(),
        inside_acknowledged: ins.acknowledged.len(),
        inside_last_ack_ms: inside_last.map(|i| (i as f64 - t0 as f64) / 1000.0),
        lost: audit.lost.len(),
        indeterminate: audit.indeterminate,
        indeterminate_applied: audit.indeterminate_applied,
        balances_conserved: audit.balances_conserved && audit.balances_match_transfers,
        split_brain,
        rejoin_ms,
        switch_back_ms,
    })
}

impl RegionDisasterReport {
    pub const VERSION: u32 = 2;

    /// KR2.1 held, the regional RTO goal was met and no write was acknowledged twice.
    pub fn pass(&self) -> bool {
        self.kr2_1_pass && self.rto_pass && !self.split_brain
    }
}

/// The regional disaster `o.injections` times on a fresh platform of the lab's reference
/// zone (brought up if it is not); see the module's documentation.
pub fn region_disaster(
    lab: &Lab,
    exe: &Path,
    state_dir: &Path,
    o: &RegionDisasterOptions,
    obs: &dyn Observer,
) -> anyhow::Result<RegionDisasterReport> {
    if o.injections == 0 || o.clients == 0 {
        bail!("at least one injection and one client are needed");
    }
    let p = fresh_platform(lab, exe, state_dir, obs)?;
    if p.plan.policy().replication != Replication::Sync {
        bail!("the zone's database tier is not synchronous; the benchmark needs Tier 1 sync");
    }
    if region_sites(&p).is_empty() {
        bail!("the zone has no database site in {LOST_REGION}");
    }
    let conditions = Conditions::start(lab, &p, o.network)?;
    let result = (|| -> anyhow::Result<Vec<RegionInjection>> {
        let mut out = Vec::new();
        let mut seed = unix_us() | 1;
        for i in 0..o.injections {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let after = Duration::from_millis(2000 + seed % 4000);
            obs.step(&format!(
                "regional disaster {}/{} at {:.1} s into the load",
                i + 1,
                o.injections,
                after.as_secs_f64()
            ));
            out.push(one(&p, exe, state_dir, o, after)?);
        }
        obs.step("what the consensus placement costs");
        Ok(out)
    })();
    let cost = result.as_ref().ok().map(|_| placement_cost(&p));
    let cross_traffic = conditions.end(lab, obs);
    let injections = result.map_err(|e| anyhow!("{e:#}"))?;
    let placement_cost = cost.transpose()?.unwrap_or_default();
    let mut rtos: Vec<f64> = injections.iter().filter_map(|i| i.rto_ms).collect();
    rtos.sort_by(f64::total_cmp);
    let mut leaders: Vec<f64> = injections.iter().filter_map(|i| i.leader_ms).collect();
    leaders.sort_by(f64::total_cmp);
    let all_recovered = rtos.len() == injections.len();
    let lost: usize = injections.iter().map(|i| i.lost).sum();
    Ok(RegionDisasterReport {
        header: Header::new("region-disaster", RegionDisasterReport::VERSION),
        network: o.network,
        cross_traffic,
        clients: o.clients,
        region_rto_ms: rtos.last().copied(),
        region_rto_median_ms: percentile(&rtos, 0.5),
        region_rto_p95_ms: percentile(&rtos, 0.95),
        leader_ms_median: percentile(&leaders, 0.5),
        rpo_lost_transactions: lost,
        indeterminate_transactions: injections.iter().map(|i| i.indeterminate).sum(),
        rejoin_ms: injections.iter().map(|i| i.rejoin_ms).fold(0.0, f64::max),
        split_brain: injections.iter().any(|i| i.split_brain),
        rto_pass: all_recovered
            && rtos.last().is_some_and(|&r| r <= 15_000.0)
            && percentile(&rtos, 0.5).is_some_and(|m| m <= 5_000.0),
        kr2_1_pass: lost == 0 && injections.iter().all(|i| i.balances_conserved),
        injections,
        placement_cost,
    })
}
