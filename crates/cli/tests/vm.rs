//! End-to-end tests of VMs and live migration: real QEMU guests (TCG here, KVM where it
//! boots) in the lab's host namespaces. Gated by `DCZONE_E2E=1`; need `scripts/build`.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dczone_lab::sys;

mod common;

use common::{e2e_enabled, TestLab};

/// Sends ledger requests from the client host and returns the answers.
fn ledger(lab: &TestLab, ip: Ipv4Addr, requests: &'static [&'static str]) -> Vec<String> {
    sys::in_namespace(&format!("{}-dc1.1-client", lab.name), move || {
        let s = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), Duration::from_secs(5))
            .expect("connect to the guest ledger");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        requests
            .iter()
            .map(|req| {
                writeln!(w, "{req}").unwrap();
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                line.trim().to_string()
            })
            .collect()
    })
    .unwrap()
    .join()
    .unwrap()
}

fn field<'a>(stats: &'a str, key: &str) -> &'a str {
    stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {stats}"))
}

#[test]
fn group_migration_reports_svc_t2_and_a_cut_link_leaves_the_source_running() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2egrp");
    lab.ok(&["lab", "up"]);
    let create = |name: &'static str, host: &'static str, dirty: &'static str| {
        let mut cmd = lab.command();
        cmd.args([
            "vm",
            "create",
            name,
            "--host",
            host,
            "--dirty-mbps",
            dirty,
            "--group",
            "g",
        ]);
        std::thread::spawn(move || cmd.output().expect("dczone runs"))
    };
    let a = create("ga", "dc1.1-h1", "1");
    let b = create("gb", "dc1.1-h2", "4");
    for h in [a, b] {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let g = lab.json(&[
        "migrate",
        "--group",
        "g",
        "--to",
        "dc1.2",
        "--strategy",
        "parallel",
        "--json",
    ]);
    let vms = g["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2);
    let t2s: Vec<f64> = vms.iter().map(|v| v["t2_ms"].as_f64().unwrap()).collect();
    let (span, union) = (
        g["svc_t2_ms"].as_f64().unwrap(),
        g["svc_t2_union_ms"].as_f64().unwrap(),
    );
    assert!(span + 0.01 >= union, "SVC-T2 {span} < union {union}");
    assert!(union + 0.01 >= t2s.iter().cloned().fold(0.0, f64::max));
    assert!(union <= t2s.iter().sum::<f64>() + 0.01);
    for v in vms {
        assert!(v["to"].as_str().unwrap().starts_with("dc1.2"));
    }

    // Cut the link in the middle of a migration back: the migration fails, the VM keeps
    // serving at its source, and no destination QEMU is left behind.
    let gb_ip = vm_ip(&lab, "gb");
    let child = lab
        .command()
        .args(["migrate", "gb", "--to", "dc1.1-h2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    lab.ok(&["lab", "link", "cut", "dc1.1", "dc1.2"]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "migration over a cut link succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keeps running"), "{err}");
    let vm = lab.json(&["vm", "show", "gb", "--json"]);
    assert!(vm["host"].as_str().unwrap().starts_with("dc1.2"), "{vm}");
    assert!(!vm["running"].is_null());
    // The destination's agent, cut off from the source's, kills the waiting QEMU once the
    // migration's keepalive lapses (5 s).
    let qemus = || lab.qemus("dc1.1-h2");
    let t = std::time::Instant::now();
    while !qemus().is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        qemus().is_empty(),
        "destination QEMU left behind: {:?}",
        qemus()
    );
    lab.ok(&["lab", "link", "restore", "dc1.1", "dc1.2"]);
    // The source still serves (from the client at dc1.1, through the restored link).
    let answer = ledger(&lab, gb_ip, &["S"]).remove(0);
    assert!(answer.starts_with("processed="), "{answer}");
}

/// Boots `vms` (name, host, dirty MB/s) in parallel as members of `group`.
fn create_group(lab: &TestLab, vms: &[(&str, &str, &str)], group: &str) {
    let creating: Vec<_> = vms
        .iter()
        .map(|&(name, host, dirty)| {
            let mut cmd = lab.command();
            cmd.args(["vm", "create", name, "--host", host, "--dirty-mbps", dirty])
                .args(["--group", group]);
            std::thread::spawn(move || cmd.output().expect("dczone runs"))
        })
        .collect();
    for h in creating {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A VM's guest address.
fn vm_ip(lab: &TestLab, name: &str) -> Ipv4Addr {
    common::guest_ip(&lab.json(&["vm", "show", name, "--json"]))
}

#[test]
fn a_killed_group_migration_is_settled_and_the_sources_serve() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2ekill");
    lab.ok(&["lab", "up"]);
    let vms = [("ka", "dc1.1-h1", "1"), ("kb", "dc1.1-h2", "4")];
    create_group(&lab, &vms, "k");
    let ip = |name: &str| vm_ip(&lab, name);
    let ips: Vec<Ipv4Addr> = vms.iter().map(|v| ip(v.0)).collect();

    // Kill the command, the coordinator (as Ctrl-C or a crash would), while both VMs are
    // being sent: the coordinated strategy holds them for seconds, so neither can have
    // finished. The source hosts' agents give the silent coordinator's legs up.
    kill_migration_and_settle(&lab, &vms, &ips, None, |lab| {
        !lab.qemus("dc1.2-h1").is_empty() && !lab.qemus("dc1.2-h2").is_empty()
    });
    // Kill the legs' drivers, the source hosts' agents, just after they started a
    // destination, before they recorded it (a QEMU nobody would own if the restarted agent
    // looked only at the record).
    kill_migration_and_settle(
        &lab,
        &vms,
        &ips,
        Some("migrate-after-destination=sleep(30000)"),
        |lab| !lab.qemus("dc1.2-h1").is_empty() || !lab.qemus("dc1.2-h2").is_empty(),
    );
    // And nothing is left locked or half-done: the group migrates.
    let g = lab.json(&[
        "migrate",
        "--group",
        "k",
        "--to",
        "dc1.2",
        "--strategy",
        "parallel",
        "--json",
    ]);
    assert_eq!(g["vms"].as_array().unwrap().len(), 2, "{g}");
}

/// Starts a coordinated migration of group `k` to DC1.2 and kills the command 1 s after
/// `started` holds; with `failpoints`, the source hosts' agents run with them (restarted by
/// the command) and are killed too. Then checks that it is settled: each VM runs once, at
/// its source, serving, and no destination QEMU is left.
fn kill_migration_and_settle(
    lab: &TestLab,
    vms: &[(&str, &str, &str)],
    ips: &[Ipv4Addr],
    failpoints: Option<&str>,
    started: impl Fn(&TestLab) -> bool,
) {
    let mut cmd = lab.command();
    cmd.args([
        "migrate",
        "--group",
        "k",
        "--to",
        "dc1.2",
        "--strategy",
        "coordinated",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let sources: Vec<&str> = vms.iter().map(|v| v.1).collect();
    if let Some(f) = failpoints {
        cmd.env("FAILPOINTS", f);
        for host in &sources {
            lab.kill_agent(host);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let t = Instant::now();
    while !started(lab) && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "{failpoints:?}: the destinations never started"
    );
    std::thread::sleep(Duration::from_millis(1000));
    child.kill().unwrap();
    child.wait().unwrap();
    if failpoints.is_some() {
        for host in &sources {
            lab.kill_agent(host);
        }
    }

    let t = Instant::now();
    let settled = || {
        lab.qemus("dc1.2-h1").is_empty()
            && lab.qemus("dc1.2-h2").is_empty()
            && lab.qemus("dc1.1-h1").len() == 1
            && lab.qemus("dc1.1-h2").len() == 1
    };
    // Legs given up after LEG_KEEPALIVE (5 s), destinations after INCOMING_KEEPALIVE (5 s).
    while !settled() && t.elapsed() < Duration::from_secs(25) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let hosts = ["dc1.1-h1", "dc1.1-h2", "dc1.2-h1", "dc1.2-h2"];
    let left = hosts.map(|h| (h, lab.qemus(h).len()));
    assert!(
        settled(),
        "{failpoints:?}: QEMUs left after the kill (host, count): {left:?}{}",
        lab.agent_log_tail(&hosts)
    );
    for ((name, host, _), ip) in vms.iter().zip(ips) {
        let vm = lab.json(&["vm", "show", name, "--json"]);
        assert_eq!(vm["host"], *host, "{failpoints:?}: {vm}");
        let t = Instant::now();
        // Still being cancelled (the guest stays stopped until then): ask again.
        let answer = loop {
            let a = ledger(lab, *ip, &["S"]).remove(0);
            if a.starts_with("processed=") || t.elapsed() > Duration::from_secs(10) {
                break a;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            answer.starts_with("processed="),
            "{failpoints:?}: {name}: {answer}"
        );
    }
}

/// A client on one long-lived TCP connection to `ip`: a transfer every 20 ms, blocking,
/// no application retry (only the kernel's TCP retransmits; 30 s read timeout). Returns (sent,
/// answered, the longest wait for an answer).
fn long_lived_client(
    ns: String,
    ip: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64, Duration)> {
    sys::in_namespace(&ns, move || {
        let s = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), Duration::from_secs(5))
            .expect("connect to the guest ledger");
        s.set_nodelay(true).unwrap();
        // Far beyond any switchover: only a connection that TCP cannot recover ends here.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let (mut sent, mut answered, mut worst) = (0u64, 0u64, Duration::ZERO);
        let mut line = String::new();
        let base = u64::from(u32::from(ip)) << 20;
        while !stop.load(Ordering::SeqCst) {
            sent += 1;
            let t0 = Instant::now();
            if writeln!(w, "T {} 1 2 1", base + sent).is_err() {
                break;
            }
            line.clear();
            match r.read_line(&mut line) {
                Ok(n) if n > 0 && line.starts_with("OK") => answered += 1,
                _ => break,
            }
            worst = worst.max(t0.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        (sent, answered, worst)
    })
    .unwrap()
}

#[test]
fn a_cluster_switches_together_on_every_run_of_either_strategy_and_long_lived_clients_lose_nothing()
{
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2epc");
    lab.ok(&["lab", "up"]);
    let vms = [
        ("pa", "dc1.1-h1", "256", "1"),
        ("pb", "dc1.1-h2", "384", "4"),
        ("pc", "dc1.1-h1", "512", "8"),
    ];
    let creates: Vec<_> = vms
        .iter()
        .map(|&(name, host, mem, dirty)| {
            let mut cmd = lab.command();
            cmd.args([
                "vm",
                "create",
                name,
                "--host",
                host,
                "--memory",
                mem,
                "--dirty-mbps",
                dirty,
                "--group",
                "pc",
            ]);
            std::thread::spawn(move || cmd.output().expect("dczone runs"))
        })
        .collect();
    for h in creates {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ip = |name: &str| vm_ip(&lab, name);
    let boots: Vec<String> = vms
        .iter()
        .map(|v| field(&ledger(&lab, ip(v.0), &["S"])[0], "boot").to_string())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = vms
        .iter()
        .map(|v| long_lived_client(lab.ns("dc1.1-client"), ip(v.0), stop.clone()))
        .collect();
    // The common stop (the default) twice, then the post-copy switch, on guests whose
    // memory is 75 % full.
    let plan = [
        ("dc1.2", "coordinated"),
        ("dc1.1", "coordinated"),
        ("dc1.2", "postcopy"),
    ];
    for (run, (to, strategy)) in plan.iter().enumerate() {
        let g = lab.json(&[
            "migrate",
            "--group",
            "pc",
            "--to",
            to,
            "--strategy",
            strategy,
            "--json",
        ]);
        let svc_t2 = g["svc_t2_ms"].as_f64().unwrap();
        let t2s: Vec<f64> = g["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["t2_ms"].as_f64().unwrap())
            .collect();
        let parts: Vec<String> = g["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                format!(
                    "{}: send {} load {}",
                    v["vm"], v["t2_send_ms"], v["t2_load_resume_ms"]
                )
            })
            .collect();
        eprintln!(
            "run {run} ({strategy}) to {to}: SVC-T2 {svc_t2:.0} ms, T2 {t2s:?}, switched: {}, {parts:?}",
            g["switch_reason"]
        );
        // KR1.1 on every run (the test holds the KR, not the stretch goal).
        assert!(svc_t2 < 1000.0, "run {run}: SVC-T2 {svc_t2} ms");
        for v in g["vms"].as_array().unwrap() {
            assert!(v["to"].as_str().unwrap().starts_with(to), "{v}");
            if *strategy == "postcopy" {
                assert!(v["postcopy_ms"].as_f64().unwrap() >= 0.0, "{v}");
            }
            // The source host kept the VM's frames and saw the destination's announce, so
            // what reached the stopped source was replayed to the destination at once.
            assert!(v["keeper_error"].is_null(), "{v}");
            assert_eq!(v["keeper"]["announce_timed_out"], false, "{v}");
            assert!(
                v["keeper"]["announce_after_stop_ms"].as_f64().unwrap() < 1000.0,
                "{v}"
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    for (c, v) in clients.into_iter().zip(&vms) {
        let (sent, answered, worst) = c.join().unwrap();
        eprintln!(
            "{}: {answered}/{sent} answered, longest wait {worst:?}",
            v.0
        );
        assert!(sent > 50, "{}: the client hardly ran ({sent})", v.0);
        // The connection survived three migrations; at most the last request, sent as the
        // client stopped, may be unanswered.
        assert!(
            answered + 1 >= sent,
            "{}: {answered} of {sent} answered",
            v.0
        );
    }
    for (v, boot) in vms.iter().zip(&boots) {
        let s = &ledger(&lab, ip(v.0), &["S"])[0];
        assert_eq!(field(s, "boot"), boot, "{} rebooted", v.0);
    }
    // Every VM runs exactly once: one QEMU per VM in the lab.
    let listed = lab.json(&["vm", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let mut qemus = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-system") && cmdline.contains(&format!("/{}/", lab.name)) {
            qemus += 1;
        }
    }
    assert_eq!(qemus, 3, "QEMU processes of the lab");
}

/// Does the VM's ledger answer within `timeout` (from the client host)?
fn answers(lab: &TestLab, ip: Ipv4Addr, timeout: Duration) -> bool {
    sys::in_namespace(&lab.ns("dc1.1-client"), move || {
        let Ok(s) = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), timeout) else {
            return false;
        };
        s.set_read_timeout(Some(timeout)).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut line = String::new();
        writeln!(w, "S").is_ok()
            && BufReader::new(s).read_line(&mut line).is_ok()
            && line.starts_with("processed=")
    })
    .unwrap()
    .join()
    .unwrap()
}

#[test]
fn a_group_that_cannot_converge_stops_together_and_a_cut_after_the_stop_resumes_every_source() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2estop");
    lab.ok(&["lab", "up"]);
    let vms = [("sa", "dc1.1-h1", "1"), ("sb", "dc1.1-h2", "4")];
    create_group(&lab, &vms, "s");
    let ip = |name: &str| vm_ip(&lab, name);
    let ips: Vec<Ipv4Addr> = vms.iter().map(|v| ip(v.0)).collect();
    let boots: Vec<String> = ips
        .iter()
        .map(|&a| field(&ledger(&lab, a, &["S"])[0], "boot").to_string())
        .collect();
    let child = lab
        .command()
        .args(["migrate", "--group", "s", "--to", "dc1.2"])
        .args(["--strategy", "coordinated", "--max-hold-s", "30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The path shrinks to a trickle (2 Mbit/s in the lab) at once: no dirty set can be
    // drained, no VM converges, and the hold (30 s) expires: every source stops together.
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    lab.ok(&[
        "lab",
        "link",
        "set",
        "dc1.1",
        "dc1.2",
        "--bandwidth",
        "128Mbit",
    ]);
    while started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
    }
    // The hold is counted from the streams' start, after every destination is prepared
    // (seconds through the agents on a busy host): wait for the stop, not for a moment.
    let stopped = || {
        ips.iter()
            .all(|&a| !answers(&lab, a, Duration::from_millis(500)))
    };
    while !stopped() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(250));
    }
    for &a in &ips {
        assert!(
            !answers(&lab, a, Duration::from_millis(500)),
            "{a} still answers: the common stop after the hold did not happen"
        );
    }
    // The path is cut while the stopped VMs still send what they left: the stream stalls,
    // the migration is cancelled and every source resumes.
    lab.ok(&["lab", "link", "cut", "dc1.1", "dc1.2"]);
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "a migration over a cut link succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keeps running"), "{err}");
    for ((v, &a), boot) in vms.iter().zip(&ips).zip(&boots) {
        let shown = lab.json(&["vm", "show", v.0, "--json"]);
        assert_eq!(shown["host"], v.1, "{shown}");
        let s = &ledger(&lab, a, &["S"])[0];
        assert_eq!(field(s, "boot"), boot, "{} rebooted", v.0);
    }
    // Every VM runs exactly once: no destination QEMU is left once the keepalive lapses.
    let t = Instant::now();
    while (!lab.qemus("dc1.2-h1").is_empty() || !lab.qemus("dc1.2-h2").is_empty())
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(lab.qemus("dc1.2-h1").is_empty() && lab.qemus("dc1.2-h2").is_empty());
    assert_eq!(lab.qemus("dc1.1-h1").len() + lab.qemus("dc1.1-h2").len(), 2);
}

#[test]
fn a_path_cut_during_post_copy_pauses_and_the_migration_resumes_when_it_is_back() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2erec");
    lab.ok(&["lab", "up"]);
    let vms = [("ra", "dc1.1-h1", "1"), ("rb", "dc1.1-h2", "4")];
    create_group(&lab, &vms, "r");
    let ips: Vec<Ipv4Addr> = vms.iter().map(|v| vm_ip(&lab, v.0)).collect();
    let boots: Vec<String> = ips
        .iter()
        .map(|&a| field(&ledger(&lab, a, &["S"])[0], "boot").to_string())
        .collect();
    // Over TLS, as every stream between sites: the source is paused first, because a
    // source whose stream the destination's pause broke fails instead of pausing ("The TLS
    // connection was non-properly terminated").
    let child = lab
        .command()
        .args(["migrate", "--group", "r", "--to", "dc1.2"])
        .args(["--strategy", "postcopy", "--max-hold-s", "30", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A trickle (15.6 Mbit/s in the lab) keeps the post-copy phase long: the memory the
    // VMs switched with takes minutes to arrive. The switch comes when the hold (30 s)
    // expires. Not slower: the device state must reach the destination, behind the
    // megabytes queued in the stream's socket buffers, before the cut, so that the
    // destination runs (a destination that has not started cannot pause, only fail).
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let link = |bandwidth: &str| {
        lab.ok(&[
            "lab",
            "link",
            "set",
            "dc1.1",
            "dc1.2",
            "--bandwidth",
            bandwidth,
        ])
    };
    link("1Gbit");
    while started.elapsed() < Duration::from_secs(38) {
        std::thread::sleep(Duration::from_millis(500));
    }
    // Cut during post-copy: the streams stall, both ends pause; the VMs cannot go back.
    lab.ok(&["lab", "link", "cut", "dc1.1", "dc1.2"]);
    std::thread::sleep(Duration::from_secs(5));
    lab.ok(&["lab", "link", "restore", "dc1.1", "dc1.2"]);
    link("25Gbit");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let recoveries: u64 = g["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["postcopy_recoveries"].as_u64().unwrap())
        .sum();
    assert!(recoveries >= 1, "no post-copy recovery: {g}");
    for ((v, &a), boot) in vms.iter().zip(&ips).zip(&boots) {
        let shown = lab.json(&["vm", "show", v.0, "--json"]);
        assert!(
            shown["host"].as_str().unwrap().starts_with("dc1.2"),
            "{shown}"
        );
        let s = &ledger(&lab, a, &["S"])[0];
        assert_eq!(field(s, "boot"), boot, "{} rebooted", v.0);
    }
    // Every VM runs exactly once, at its destination.
    assert!(lab.qemus("dc1.1-h1").is_empty() && lab.qemus("dc1.1-h2").is_empty());
    assert_eq!(lab.qemus("dc1.2-h1").len() + lab.qemus("dc1.2-h2").len(), 2);
}

/// The hosts whose QEMU runs `vm` (its state lives under `<lab>/vms/<vm>/<host>/`).
fn vm_qemu_hosts(lab: &TestLab, vm: &str) -> Vec<String> {
    let marker = format!("/{}/vms/{vm}/", lab.name);
    let mut hosts = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.starts_with("qemu-system") {
            continue;
        }
        if let Some((_, rest)) = cmdline.split_once(&marker) {
            hosts.push(rest.split('/').next().unwrap_or_default().to_string());
        }
    }
    hosts
}

#[test]
fn a_failure_at_each_step_of_a_group_migration_leaves_every_vm_running_exactly_once() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2efail");
    lab.ok(&["lab", "up"]);
    let vms = [("fa", "dc1.1-h1", "1"), ("fb", "dc1.1-h2", "4")];
    create_group(&lab, &vms, "f");
    let ips: Vec<Ipv4Addr> = vms.iter().map(|v| vm_ip(&lab, v.0)).collect();
    let boots: Vec<String> = ips
        .iter()
        .map(|&a| field(&ledger(&lab, a, &["S"])[0], "boot").to_string())
        .collect();
    // Before the point of no return the sources run on; after the destination took over,
    // the source hosts' agents move the records to where the VMs run. Between the two (the
    // streams complete, the destinations' agents not yet told to finish, or told but not
    // yet recorded), the source hosts' agents ask the destinations' what became of each VM,
    // as they must on real hosts, where no file of the other host can be read.
    for (point, moves) in [
        ("migrate-after-prepare", false),
        ("migrate-after-start", false),
        ("migrate-after-common-stop", false),
        ("migrate-before-finish", false),
        ("migrate-before-takeover-record", true),
        ("migrate-after-takeover", true),
    ] {
        // The group moves from where it is to the other DC1 site. The command restarts the
        // source hosts' agents with its FAILPOINTS: a leg's own steps (the takeover) fail
        // there.
        let sources: Vec<String> = vms
            .iter()
            .map(|v| {
                lab.json(&["vm", "show", v.0, "--json"])["host"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let (from, to) = if sources.iter().all(|h| h.starts_with("dc1.1")) {
            ("dc1.1", "dc1.2")
        } else {
            ("dc1.2", "dc1.1")
        };
        for host in &sources {
            lab.kill_agent(host);
        }
        let out = lab
            .command()
            .args(["migrate", "--group", "f", "--to", to])
            .env("FAILPOINTS", format!("{point}=return"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{point}: the migration succeeded");
        assert!(err.contains(point), "{point}: {err}");
        let want = if moves { to } else { from };
        let t = Instant::now();
        let settled = |v: &str| {
            let host = lab.json(&["vm", "show", v, "--json"])["host"]
                .as_str()
                .unwrap()
                .to_string();
            let running = vm_qemu_hosts(&lab, v);
            (
                host.starts_with(want) && running == [host.clone()],
                host,
                running,
            )
        };
        while !vms.iter().all(|v| settled(v.0).0) && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(250));
        }
        for ((v, &a), boot) in vms.iter().zip(&ips).zip(&boots) {
            let (ok, host, running) = settled(v.0);
            assert!(
                ok,
                "{point}: {} recorded on {host}, QEMU on {running:?}, expected once on {want}",
                v.0
            );
            let s = &ledger(&lab, a, &["S"])[0];
            assert_eq!(field(s, "boot"), boot, "{point}: {} rebooted", v.0);
        }
    }
}

/// A source host's agent lost in the middle of a group migration (its control plane gone,
/// the host itself fine): the coordinator fails the migration and names the agent; every
/// VM runs exactly once, at its source, without a restart (the destination waiting for the
/// lost agent's VM is reaped by its own agent's keepalive); once the agent is back it
/// settles what it left, and the group migrates.
#[test]
fn a_source_agent_lost_mid_group_migration_fails_it_and_every_vm_runs_once() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2elost");
    lab.ok(&["lab", "up"]);
    let vms = [("la", "dc1.1-h1", "1"), ("lb", "dc1.1-h2", "4")];
    create_group(&lab, &vms, "l");
    let ips: Vec<Ipv4Addr> = vms.iter().map(|v| vm_ip(&lab, v.0)).collect();
    let boots: Vec<String> = ips
        .iter()
        .map(|&a| field(&ledger(&lab, a, &["S"])[0], "boot").to_string())
        .collect();
    let child = lab
        .command()
        .args(["migrate", "--group", "l", "--to", "dc1.2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while (lab.qemus("dc1.2-h1").is_empty() || lab.qemus("dc1.2-h2").is_empty())
        && t.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "the destinations never started"
    );
    // Both VMs are being sent, held by the coordinated strategy.
    std::thread::sleep(Duration::from_millis(1000));
    lab.kill_agent("dc1.1-h2");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the migration succeeded without its agent"
    );
    assert!(
        err.contains("10.77.1.12:7070"),
        "the lost agent is not named: {err}"
    );

    let runs_once_at_source = || {
        vms.iter()
            .all(|&(name, host, _)| vm_qemu_hosts(&lab, name) == [host.to_string()])
    };
    let t = Instant::now();
    while !runs_once_at_source() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
    }
    for &(name, host, _) in &vms {
        assert_eq!(
            vm_qemu_hosts(&lab, name),
            [host.to_string()],
            "{name} does not run exactly once at its source{}",
            lab.agent_log_tail(&["dc1.1-h1", "dc1.1-h2", "dc1.2-h1", "dc1.2-h2"])
        );
    }
    for ((v, &a), boot) in vms.iter().zip(&ips).zip(&boots) {
        let s = &ledger(&lab, a, &["S"])[0];
        assert_eq!(field(s, "boot"), boot, "{} rebooted", v.0);
    }
    // The agent comes back with the next command, settles its marker, and the group moves.
    let g = lab.json(&[
        "migrate",
        "--group",
        "l",
        "--to",
        "dc1.2",
        "--strategy",
        "parallel",
        "--json",
    ]);
    assert_eq!(g["vms"].as_array().unwrap().len(), 2, "{g}");
}
