//! Tables of the database benchmarks' reports (`bench inter-region`, `bench switchover`,
//! `bench region-disaster`).

use dczone_bench::inter_region::{InterRegionReport, SwitchoverReport};
use dczone_bench::region::RegionDisasterReport;

use crate::table::{render, yes_no};

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}

/// Where TATrsync goes at each distance, and the saturation sweep.
fn print_sync_cost(r: &InterRegionReport) {
    let rows: Vec<Vec<String>> = r
        .distances
        .iter()
        .filter_map(|d| d.sync.sync_cost.as_ref().map(|c| (d, c)))
        .map(|(d, c)| {
            vec![
                format!("{:.0}", d.distance_km),
                format!("{:.2}", c.rtt_nominal_ms),
                opt2(c.network_excess_ms),
                opt2(c.standby_receive_ms),
                format!("{:.2}", c.standby_flush_ms),
                opt2(d.sync.tatrsync_excess_ms),
                opt2(d.sync.tatrsync_p99_ms),
            ]
        })
        .collect();
    if !rows.is_empty() {
        println!("where TATrsync goes (sync, means of 100 ms samples):");
        print!(
            "{}",
            render(
                &[
                    "km",
                    "fibre RTT ms",
                    "+ network ms",
                    "+ standby receive ms",
                    "+ standby flush ms",
                    "= excess ms",
                    "TATrsync p99 ms"
                ],
                &rows
            )
        );
    }
    if !r.saturation.is_empty() {
        let rows: Vec<Vec<String>> = r
            .saturation
            .iter()
            .map(|s| {
                vec![
                    s.mode.clone(),
                    s.clients.to_string(),
                    format!("{:.0}", s.ptrx),
                    format!("{:.2}", s.tatrxn_p50_ms),
                    opt2(s.tatrsync_excess_ms),
                ]
            })
            .collect();
        println!("saturation sweep at 500 km:");
        print!(
            "{}",
            render(
                &["mode", "clients", "Ptrx/s", "TATrxn p50 ms", "excess ms"],
                &rows
            )
        );
        if let (Some(s), Some(a)) = (r.sync_ptrx_saturated, r.async_ptrx_saturated) {
            println!(
                "Ptrx at saturation: sync {s:.0}/s, async {a:.0}/s, ratio {:.2}",
                s / a.max(1e-9)
            );
        }
    }
}

fn opt2(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

pub fn print_inter_region(r: &InterRegionReport) {
    println!(
        "UC2 inter-region replication, {} clients (ledger transfers), {} WAN{}",
        r.clients,
        r.network.wan,
        match &r.cross_traffic {
            Some(c) => format!(
                ", bulk cross traffic {} -> {} ({} flows, {:.0} lab Mbit/s)",
                c.from, c.to, c.flows, c.lab_mbit
            ),
            None => String::new(),
        }
    );
    let mut rows = Vec::new();
    for d in &r.distances {
        for (name, m) in [("sync", &d.sync), ("async", &d.asynch)] {
            rows.push(vec![
                format!("{:.0}", d.distance_km),
                name.to_string(),
                format!("{:.0}", m.ptrx),
                format!("{:.2}", m.tatrxn_p50_ms),
                format!("{:.2}", m.tatrxn_p99_ms),
                opt(m.tatrsync_ms),
                opt(m.tatrsync_excess_ms),
                opt(m.tatrasync_ms),
                m.grey_data_transactions
                    .map_or("-".into(), |g| format!("{g:.1}")),
            ]);
        }
    }
    print!(
        "{}",
        render(
            &[
                "km",
                "mode",
                "Ptrx/s",
                "TATrxn p50 ms",
                "p99 ms",
                "TATrsync ms",
                "- RTT ms",
                "TATrasync ms",
                "grey data (txn)"
            ],
            &rows
        )
    );
    let rounds: Vec<Vec<String>> = r
        .distances
        .iter()
        .flat_map(|d| {
            d.rounds.iter().enumerate().map(move |(i, x)| {
                vec![
                    format!("{:.0}", d.distance_km),
                    (i + 1).to_string(),
                    format!("{:.0}", x.sync_ptrx),
                    format!("{:.0}", x.async_ptrx),
                    format!("{:.2}", x.sync_over_async_ptrx),
                ]
            })
        })
        .collect();
    println!("rounds (sync and async alternate; the figures above are over all of them):");
    print!(
        "{}",
        render(
            &["km", "round", "sync Ptrx/s", "async Ptrx/s", "sync / async"],
            &rounds
        )
    );
    print_sync_cost(r);
    let f = &r.fallback;
    let rows = vec![
        vec![
            "sync Ptrx / async Ptrx at 500 km".into(),
            format!("{:.2}", r.sync.ptrx / r.asynch.ptrx.max(1e-9)),
            ">= 0.7".into(),
            yes_no(r.sync_ptrx_ratio_pass),
        ],
        vec![
            "write stall when DC2.1 is lost (ms)".into(),
            format!("{:.0}", f.stall_ms),
            "<= 1000".into(),
            yes_no(r.stall_pass),
        ],
        vec![
            format!(
                "unprotected windows opened by a bulk load (pgbench -i -s {}, {:.0} ms)",
                r.bulk_load.pgbench_scale, r.bulk_load.pgbench_ms
            ),
            r.bulk_load.unprotected_windows.to_string(),
            "0".into(),
            yes_no(r.bulk_load.unprotected_windows == 0),
        ],
        vec![
            "ledger TATrxn p99 / longest stall during the bulk load (ms)".into(),
            format!(
                "{:.0} / {:.0}",
                r.bulk_load.tatrxn_p99_ms, r.bulk_load.stall_ms
            ),
            "slow, not dead".into(),
            String::new(),
        ],
        vec![
            "unprotected window (ms)".into(),
            opt(f.unprotected_window_ms),
            "audited".into(),
            String::new(),
        ],
        vec![
            "return to sync after DC2.1 is back (ms)".into(),
            format!("{:.0}", f.return_to_sync_ms),
            String::new(),
            String::new(),
        ],
        vec![
            "failover RTO, first disaster (ms)".into(),
            opt(r.failover_rto_ms),
            "<= 15000".into(),
            yes_no(r.rto_pass),
        ],
        vec![
            format!("worst RTO of {} disasters (ms)", r.disasters.len()),
            opt(r.rto_max_ms),
            String::new(),
            String::new(),
        ],
        vec![
            "acknowledged transactions lost".into(),
            r.rpo_lost_transactions.to_string(),
            "0".into(),
            yes_no(r.rpo_lost_transactions == 0),
        ],
        vec![
            "indeterminate transactions (listed)".into(),
            r.indeterminate_transactions.to_string(),
            String::new(),
            String::new(),
        ],
        vec![
            "KR2.1 RPO = 0 (Tier 1)".into(),
            String::new(),
            String::new(),
            yes_no(r.kr2_1_pass),
        ],
        vec![
            "KR2.2 RTO < 30 min (Tier 1)".into(),
            String::new(),
            String::new(),
            yes_no(r.kr2_2_tier1_pass),
        ],
    ];
    print!(
        "{}",
        render(&["metric", "value", "target", "verdict"], &rows)
    );
    let rows: Vec<Vec<String>> = r
        .disasters
        .iter()
        .map(|d| {
            vec![
                format!("{:.1}", d.injected_after_ms / 1000.0),
                format!("{} -> {}", d.old_primary, d.new_primary),
                opt(d.rto_ms),
                d.acknowledged.to_string(),
                d.lost.to_string(),
                format!("{} ({} applied)", d.indeterminate, d.indeterminate_applied),
                yes_no(d.rpo_zero && d.balances_conserved),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "at s",
                "failover",
                "RTO ms",
                "acked",
                "lost",
                "indeterminate",
                "audit"
            ],
            &rows
        )
    );
}

pub fn print_switchover(report: &SwitchoverReport) {
    let rows: Vec<Vec<String>> = report
        .rounds
        .iter()
        .map(|r| {
            vec![
                format!("{} -> {}", r.from, r.to),
                format!("{:.0}", r.leader_ms),
                format!("{:.0}", r.first_commit_ms),
                format!("{:.0}", r.rejoined_ms),
                format!("{:.0}", r.client_stall_ms),
                r.acknowledged.to_string(),
                r.lost.to_string(),
                r.indeterminate.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "SWITCHOVER",
                "LEADER_MS",
                "FIRST_COMMIT_MS",
                "REJOINED_MS",
                "CLIENT_STALL_MS",
                "ACKED",
                "LOST",
                "INDETERMINATE"
            ],
            &rows
        )
    );
    println!(
        "client stall median {:.0} ms, worst {:.0} ms; acknowledged transactions lost: {}",
        report.client_stall_ms_median, report.client_stall_ms_max, report.rpo_lost_transactions
    );
}

pub fn print_region_disaster(report: &RegionDisasterReport) {
    println!(
        "regional disasters on the {} WAN{}",
        report.network.wan,
        match &report.cross_traffic {
            Some(c) => format!(
                ", bulk cross traffic {} -> {} ({} flows, {:.0} lab Mbit/s)",
                c.from, c.to, c.flows, c.lab_mbit
            ),
            None => String::new(),
        }
    );
    let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.0}"));
    let rows: Vec<Vec<String>> = report
        .injections
        .iter()
        .map(|i| {
            vec![
                format!("{:.1}", i.injected_after_ms / 1000.0),
                format!("{} -> {}", i.old_primary, i.new_primary),
                f(i.leader_ms),
                f(i.rto_ms),
                i.acknowledged.to_string(),
                i.inside_acknowledged.to_string(),
                i.lost.to_string(),
                format!("{} ({})", i.indeterminate, i.indeterminate_applied),
                yes_no(!i.split_brain),
                format!("{:.0}", i.rejoin_ms),
                format!("{:.0}", i.switch_back_ms),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "AT_S",
                "FAILOVER",
                "LEADER_MS",
                "RTO_MS",
                "ACKED",
                "INSIDE_ACKED",
                "LOST",
                "INDETERMINATE (APPLIED)",
                "NO_SPLIT_BRAIN",
                "REJOIN_MS",
                "SWITCH_BACK_MS",
            ],
            &rows
        )
    );
    println!(
        "regional RTO median {} ms, p95 {} ms, worst {} ms (goal: worst <= 15000, median <= 5000): {}",
        f(report.region_rto_median_ms),
        f(report.region_rto_p95_ms),
        f(report.region_rto_ms),
        yes_no(report.rto_pass)
    );
    println!(
        "KR2.1 RPO = 0: {} lost of {} acknowledged: {}; split brain: {}",
        report.rpo_lost_transactions,
        report
            .injections
            .iter()
            .map(|i| i.acknowledged + i.inside_acknowledged)
            .sum::<usize>(),
        yes_no(report.kr2_1_pass),
        if report.split_brain { "YES" } else { "none" }
    );
    let rows: Vec<Vec<String>> = report
        .placement_cost
        .iter()
        .map(|c| {
            vec![
                c.raft_leader_at.clone(),
                format!("{:.2}", c.lease_renew_ms_p50),
                format!("{:.2}", c.lease_renew_ms_p99),
                format!("{:.2}", c.leader_write_ms_p50),
                format!("{:.2}", c.leader_write_ms_p99),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "RAFT LEADER AT",
                "LEASE_RENEW_P50_MS",
                "P99",
                "LEADER_WRITE_P50_MS",
                "P99"
            ],
            &rows
        )
    );
}
