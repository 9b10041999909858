//! `dczone bench wan`: fidelity, capacity and memory of the APN emulator, measured on a
//! lab of the reference zone with `lab_scale = 1` (so the configured bandwidth is the
//! emulated one). Every figure is a named measurement with its unit in the name, taken
//! `runs` times after a warm-up, reported as min/median/max.

use std::time::Duration;

use serde::Serialize;

use dczone_apn::control;
use dczone_zone::{Zone, DEFAULT_ZONE_TOML};

use crate::probe::{self, measure_rtt, measure_tcp};
use crate::{Lab, LabError, LinkChange};

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub name: String,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// What the issue asks for, in words.
    pub target: String,
    pub pass: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WanBench {
    pub git_rev: String,
    pub runs: usize,
    pub measurements: Vec<Measurement>,
}

fn summarize(name: &str, mut values: Vec<f64>, target: &str, pass: Option<bool>) -> Measurement {
    values.sort_by(|a, b| a.total_cmp(b));
    Measurement {
        name: name.to_string(),
        min: values.first().copied().unwrap_or(f64::NAN),
        median: values.get(values.len() / 2).copied().unwrap_or(f64::NAN),
        max: values.last().copied().unwrap_or(f64::NAN),
        target: target.to_string(),
        pass,
    }
}

/// The short git revision of the working directory, for benchmark reports.
pub fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn vm_hwm_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

impl Lab {
    /// Runs the WAN benchmark on this (bench-only) lab and tears it down afterwards.
    pub fn wan_bench(&self, runs: usize, progress: &dyn Fn(&str)) -> Result<WanBench, LabError> {
        let toml = DEFAULT_ZONE_TOML.replace("lab_scale = 64", "lab_scale = 1");
        let zone = dczone_zone::file::parse(&toml, std::path::Path::new("<bench zone>"))?;
        let result = self.wan_bench_on(&zone, &toml, runs, progress);
        let _ = self.down();
        result
    }

    fn wan_bench_on(
        &self,
        zone: &Zone,
        toml: &str,
        runs: usize,
        progress: &dyn Fn(&str),
    ) -> Result<WanBench, LabError> {
        progress("lab up");
        self.up(zone, "<bench zone: reference, lab_scale 1>", toml)?;
        let pid = self.state()?.emulator_pid.unwrap_or(0);
        let socket = self.control_socket();
        let stats = || control::stats(&socket).map_err(LabError::Emulator);
        let mut out = Vec::new();
        out.push(summarize(
            "emulator_rss_idle_mib",
            vec![stats()?.rss_bytes as f64 / 1048576.0],
            "bounded",
            None,
        ));
        let a = self.host_namespace("dc1.1-h1");
        let b_ip = zone.host("dc1.2-h1").expect("reference host").ip();
        let set = |delay: f64, bw: &str| {
            self.link_set(
                "dc1.1",
                "dc1.2",
                &LinkChange {
                    one_way_delay_ms: Some(delay),
                    bandwidth: Some(bw.to_string()),
                    ..LinkChange::default()
                },
            )
        };
        let err = |step: &'static str| {
            move |source| LabError::Probe {
                step,
                a: "dc1.1".into(),
                b: "dc1.2".into(),
                source,
            }
        };

        for delay in [0.5, 2.5] {
            progress(&format!("delay fidelity at {delay} ms"));
            set(delay, "10Gbit")?;
            let expected = 2.0 * delay;
            let _ = measure_rtt(&a, b_ip, 50, Duration::ZERO).map_err(err("rtt warm-up"))?;
            let (mut p50, mut p99) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let r = measure_rtt(&a, b_ip, 500, Duration::ZERO).map_err(err("rtt"))?;
                p50.push(r.median_ms);
                p99.push(r.p99_ms);
            }
            let med = summarize(&format!("rtt_p50_ms_at_{delay}ms_one_way"), p50, "", None);
            let pass = probe::rtt_median_ok(expected, med.median);
            out.push(Measurement {
                target: format!("{expected} ms +- (2% + 0.020 ms)"),
                pass: Some(pass),
                ..med
            });
            let tail = summarize(&format!("rtt_p99_ms_at_{delay}ms_one_way"), p99, "", None);
            let pass = probe::rtt_p99_ok(expected, tail.median);
            out.push(Measurement {
                target: format!("{expected} ms +- 0.050 ms"),
                pass: Some(pass),
                ..tail
            });
        }

        for (bw, mbit, delay) in [
            ("100Mbit", 100.0, 0.5),
            ("1Gbit", 1000.0, 0.5),
            ("100Mbit", 100.0, 2.5),
            ("1Gbit", 1000.0, 2.5),
        ] {
            progress(&format!("rate fidelity at {bw}, {delay} ms"));
            set(delay, bw)?;
            let _ = measure_tcp(
                &a,
                &self.host_namespace("dc1.2-h1"),
                b_ip,
                Duration::from_millis(500),
                Duration::from_millis(200),
            )
            .map_err(err("tcp warm-up"))?;
            let mut fractions = Vec::new();
            for _ in 0..runs {
                let t = measure_tcp(
                    &a,
                    &self.host_namespace("dc1.2-h1"),
                    b_ip,
                    Duration::from_secs(2),
                    Duration::from_millis(300),
                )
                .map_err(err("tcp"))?;
                fractions.push(t.mbit / mbit * 100.0);
            }
            let m = summarize(
                &format!("tcp_pct_of_{bw}_at_{delay}ms_one_way"),
                fractions,
                "",
                None,
            );
            let pass = probe::throughput_ok(delay, m.median / 100.0);
            let bdp_kib = mbit * 1e6 * 2.0 * delay / 1e3 / 8.0 / 1024.0;
            out.push(Measurement {
                target: format!(
                    "{} (goodput ceiling {:.1}%, BDP {bdp_kib:.0} KiB)",
                    if delay <= 0.5 { "90-102%" } else { ">= 80%" },
                    probe::TCP_GOODPUT_RATIO * 100.0
                ),
                pass: Some(pass),
                ..m
            });
        }

        progress("capacity at 0.5 ms, unlimited rate");
        set(0.5, "100Gbit")?;
        let (mut gbit, mut kpps, mut ksegps, mut cpu_s_per_gb) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let before = stats()?;
            let t = measure_tcp(
                &a,
                &self.host_namespace("dc1.2-h1"),
                b_ip,
                Duration::from_secs(3),
                Duration::from_millis(300),
            )
            .map_err(err("capacity"))?;
            let after = stats()?;
            let secs = (after.uptime_ns - before.uptime_ns) as f64 / 1e9;
            let sum = |s: &control::Stats, f: fn(&dczone_apn::path::PathCounters) -> u64| {
                s.paths.iter().map(|p| f(&p.counters)).sum::<u64>()
            };
            let frames = sum(&after, |c| c.frames) - sum(&before, |c| c.frames);
            let segs = sum(&after, |c| c.segments) - sum(&before, |c| c.segments);
            let wire = sum(&after, |c| c.wire_bytes) - sum(&before, |c| c.wire_bytes);
            let cpu = (after.cpu_ns - before.cpu_ns) as f64 / 1e9;
            gbit.push(t.mbit / 1000.0);
            kpps.push(frames as f64 / secs / 1e3);
            ksegps.push(segs as f64 / secs / 1e3);
            cpu_s_per_gb.push(cpu / (wire as f64 / 1e9));
        }
        out.push(summarize("capacity_gbit_s", gbit, ">= 2 (goal 5)", None));
        let last = out.len() - 1;
        out[last].pass = Some(out[last].median >= 2.0);
        out.push(summarize(
            "capacity_kframes_per_s",
            kpps,
            "GSO super-frames",
            None,
        ));
        out.push(summarize(
            "capacity_kpackets_per_s_on_wire",
            ksegps,
            "wire segments",
            None,
        ));
        out.push(summarize("emulator_cpu_s_per_gb", cpu_s_per_gb, "", None));

        progress("same-site baseline (bridge only)");
        let mut base = Vec::new();
        for _ in 0..runs {
            let t = measure_tcp(
                &a,
                &self.host_namespace("dc1.1-h2"),
                zone.host("dc1.1-h2").expect("reference host").ip(),
                Duration::from_secs(3),
                Duration::from_millis(300),
            )
            .map_err(err("baseline"))?;
            base.push(t.mbit / 1000.0);
        }
        out.push(summarize(
            "bridge_only_gbit_s",
            base,
            "same run, for the ratio",
            None,
        ));

        let s = stats()?;
        out.push(summarize(
            "emulator_rss_peak_mib",
            vec![vm_hwm_bytes(pid) as f64 / 1048576.0],
            "bounded",
            None,
        ));
        out.push(summarize(
            "emulator_rss_after_load_mib",
            vec![s.rss_bytes as f64 / 1048576.0],
            "bounded",
            None,
        ));
        Ok(WanBench {
            git_rev: git_rev(),
            runs,
            measurements: out,
        })
    }
}
