//! The reference's scenarios as benchmarks, each run end to end on a lab through the
//! zone's host agents and returning one typed, versioned report:
//! - [`migration::intra_region`]: UC1 scenario #1, a 3-VM cluster under client load moved
//!   DC1.1 <-> DC1.2 by each strategy (SVC-T1, SVC-T2, KR1.1, continuity);
//! - [`migration::sweep`]: one VM's migration against memory size and dirty rate;
//! - [`inter_region::inter_region`]: UC2, sync and async replication per distance, the
//!   fallback to async and back, disasters of the primary's site (RTO, RPO audit);
//! - [`inter_region::switchover`]: planned switchovers under load, each audited;
//! - [`region::region_disaster`]: region 1 lost under Tier 1 load, audited and restored;
//! - [`storage::storage`]: stretched against local write latency, and a VM with a disk
//!   live-migrated between the regions under load (T1, T2, Ptrx before and during).
//!
//! Scenarios say what they are doing through an [`Observer`]; they print nothing. The
//! command line renders their reports as tables, or writes them as JSON.

pub mod ap_db;
pub mod cloud;
pub mod inter_region;
pub mod migration;
pub mod region;
pub mod storage;

use serde::Serialize;

/// What every report starts with: which report, its version (raised when a field changes
/// meaning or goes away), and the commit that produced it.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub report: &'static str,
    pub version: u32,
    pub git_rev: String,
}

impl Header {
    fn new(report: &'static str, version: u32) -> Header {
        Header {
            report,
            version,
            git_rev: dczone_lab::wan_bench::git_rev(),
        }
    }
}

/// Where a scenario reports what it is doing while it runs. Every method has a default
/// that ignores it.
pub trait Observer: Sync {
    /// The step under way, in a few words ("500 km: sync, round 1/2").
    fn step(&self, _text: &str) {}
    /// Something went wrong that does not end the scenario (the zone may need a hand).
    fn warn(&self, _text: &str) {}
    /// A group migration's progress, VM by VM, while it runs.
    fn migration(&self, _progress: &[dczone_virt::migrate::Progress]) {}
    /// The group migration that [`Observer::migration`] followed has ended.
    fn migration_ended(&self) {}
    /// One run of the intra-region scenario, as soon as it is measured.
    fn intra_region_run(
        &self,
        _group: &dczone_virt::migrate::GroupMigration,
        _run: &migration::StrategyRun,
    ) {
    }
    /// One point of the migration sweep, as soon as it is measured.
    fn sweep_point(&self, _point: &migration::SweepPoint) {}
}

/// Nearest-rank quantile of `v` (any order); NaN for none.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.95), 5.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
