//! End-to-end tests of VMs and live migration: real QEMU guests (TCG here, KVM where it
//! boots) in the lab's host namespaces. Gated by `DCZONE_E2E=1`; need `scripts/build`.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use dczone_lab::sys;

struct TestLab {
    name: String,
    state_dir: PathBuf,
}

impl TestLab {
    fn new(name: &str) -> TestLab {
        let lab = TestLab {
            name: name.into(),
            state_dir: std::env::temp_dir().join(format!("dczone-test-{name}")),
        };
        let _ = lab.run(&["lab", "down"]);
        lab
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dczone"))
            .args(["--lab", &self.name, "--state-dir"])
            .arg(&self.state_dir)
            .args(args)
            .output()
            .expect("dczone runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "dczone {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.run(&["lab", "down"]);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

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
fn vm_boots_serves_and_migrates_with_its_state() {
    if std::env::var_os("DCZONE_E2E").is_none() {
        eprintln!("skipped: set DCZONE_E2E=1 (needs root) to run VM tests");
        return;
    }
    let lab = TestLab::new("e2evm");
    lab.ok(&["lab", "up"]);
    let vm = lab.json(&[
        "vm",
        "create",
        "ledger",
        "--host",
        "dc1.1-h1",
        "--dirty-mbps",
        "0",
        "--json",
    ]);
    assert_eq!(vm["host"], "dc1.1-h1");
    let ip: Ipv4Addr = vm["spec"]["ip_cidr"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let before = ledger(&lab, ip, &["T 1 0 1 25", "T 1 0 1 25", "B 1", "S"]);
    assert_eq!(before[0], "OK 1");
    assert_eq!(before[1], "DUP 1", "a retried transfer must apply once");
    assert_eq!(before[2], "1025");

    // Bad input: the same host, an unknown VM, an unknown host.
    let same = lab.run(&["migrate", "ledger", "--to", "dc1.1-h1"]);
    assert!(String::from_utf8_lossy(&same.stderr).contains("already on host dc1.1-h1"));
    let unknown = lab.run(&["migrate", "nope", "--to", "dc1.2-h1"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown VM 'nope'"));
    let bad_host = lab.run(&["migrate", "ledger", "--to", "dc9-h1"]);
    assert!(String::from_utf8_lossy(&bad_host.stderr).contains("unknown host 'dc9-h1'"));

    let m = lab.json(&["migrate", "ledger", "--to", "dc1.2-h1", "--json"]);
    let rec = &m["vms"][0];
    let (t1, t2) = (
        rec["t1_ms"].as_f64().unwrap(),
        rec["t2_ms"].as_f64().unwrap(),
    );
    assert!(t1 > 0.0 && t2 > 0.0, "T1 {t1} ms, T2 {t2} ms");
    assert!(t2 < 1000.0, "downtime of an idle 256 MiB guest was {t2} ms");
    assert!(
        rec["qemu_downtime_ms"].as_f64().unwrap() <= t2 + 1.0,
        "QEMU's downtime must lie within T2"
    );
    assert_eq!(m["svc_t2_ms"], rec["t2_ms"]);

    // Same VM, same address, same state, on the new host.
    let after = ledger(&lab, ip, &["S", "B 1", "T 2 1 0 5", "S"]);
    assert_eq!(
        field(&after[0], "boot"),
        field(&before[3], "boot"),
        "the guest rebooted"
    );
    assert_eq!(
        field(&after[0], "checksum"),
        field(&before[3], "checksum"),
        "state changed in flight"
    );
    assert_eq!(after[1], "1025");
    assert_eq!(after[2], "OK 2");
    let processed = |s: &str| field(s, "processed").parse::<u64>().unwrap();
    assert_eq!(
        processed(&after[0]),
        processed(&before[3]),
        "requests lost or replayed"
    );
    assert_eq!(processed(&after[3]), processed(&before[3]) + 1);
    let uptime = |s: &str| field(s, "uptime_ms").parse::<u64>().unwrap();
    assert!(
        uptime(&after[0]) > uptime(&before[3]),
        "uptime went backwards"
    );
    let list = lab.json(&["vm", "list", "--json"]);
    assert_eq!(list[0]["host"], "dc1.2-h1");

    lab.ok(&["vm", "destroy", "ledger"]);
    assert_eq!(
        lab.json(&["vm", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
}
