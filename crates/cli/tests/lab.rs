//! End-to-end tests of the lab with real namespaces, bridges, TAPs and the APN emulator.
//! They need root and are gated by `DCZONE_E2E=1`, which the test command sets.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use dczone_lab::sys;

mod common;

use common::{e2e_enabled, TestLab};

const DC11_H1: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 11);
const DC12_H1: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 11);
const DC21_H1: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 11);
const CLOUD_H1: Ipv4Addr = Ipv4Addr::new(10, 77, 4, 11);

/// Median time for a 64-byte TCP echo between two hosts.
fn tcp_echo_median(lab: &TestLab, client: &str, server: &str, server_ip: Ipv4Addr) -> Duration {
    tcp_echo_median_on(lab, client, server, server_ip, 7007)
}

/// Median time for a 64-byte TCP echo to `port` of `server`.
fn tcp_echo_median_on(
    lab: &TestLab,
    client: &str,
    server: &str,
    server_ip: Ipv4Addr,
    port: u16,
) -> Duration {
    let listener = sys::in_namespace(&lab.ns(server), move || {
        TcpListener::bind(("0.0.0.0", port))
    })
    .unwrap()
    .join()
    .unwrap()
    .expect("bind echo server");
    let server_thread = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let samples = sys::in_namespace(&lab.ns(client), move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((server_ip, port)),
            Duration::from_secs(3),
        )
        .expect("connect across the APN");
        s.set_nodelay(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..40 {
            let t0 = Instant::now();
            s.write_all(&[7u8; 64]).unwrap();
            s.read_exact(&mut buf).unwrap();
            out.push(t0.elapsed());
        }
        out
    })
    .unwrap()
    .join()
    .unwrap();
    server_thread.join().unwrap();
    let mut samples = samples[5..].to_vec();
    samples.sort();
    samples[samples.len() / 2]
}

#[test]
fn tcp_echo_dc1_1_to_dc2_1_takes_one_500_km_round_trip() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2eecho");
    lab.up();
    let median = tcp_echo_median(&lab, "dc1.1-h1", "dc2.1-h1", DC21_H1);
    // 5 ms, less the emulator's accuracy bound (2 % + 20 us: `lab calibrate` subtracts the
    // host stack's delay as measured at `lab up`, which a loaded machine can overstate),
    // plus at most 1 ms of host stack and echo server.
    assert!(
        median >= Duration::from_micros(5000 - 120) && median < Duration::from_millis(6),
        "TCP echo RTT over 500 km was {median:?}, expected 4.88-6 ms"
    );
    // Same site: no emulated delay at all.
    let local = tcp_echo_median(&lab, "dc1.1-h1", "dc1.1-h2", Ipv4Addr::new(10, 77, 1, 12));
    assert!(
        local < Duration::from_millis(1),
        "same-site echo took {local:?}"
    );
}

#[test]
fn link_cut_stops_traffic_and_restore_brings_it_back() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2ecut");
    lab.up();
    assert!(lab.reachable("dc1.1-h1", DC12_H1));
    lab.ok(&["lab", "link", "cut", "dc1.1", "dc1.2"]);
    assert!(
        !lab.reachable("dc1.1-h1", DC12_H1),
        "traffic crossed a cut link"
    );
    // The cut link is not rerouted: other links still work.
    assert!(lab.reachable("dc1.1-h1", DC21_H1));
    let status = lab.status();
    let link = status["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["a"] == "dc1.1" && l["b"] == "dc1.2")
        .unwrap();
    assert_eq!(link["cut"], true);
    lab.ok(&["lab", "link", "restore", "dc1.1", "dc1.2"]);
    assert!(
        lab.reachable("dc1.1-h1", DC12_H1),
        "restore did not bring traffic back"
    );
}

#[test]
fn isolating_a_site_cuts_it_from_all_others() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2eiso");
    lab.up();
    lab.ok(&["lab", "site", "isolate", "dc2.1"]);
    for other in [DC11_H1, DC12_H1, CLOUD_H1] {
        assert!(
            !lab.reachable("dc2.1-h1", other),
            "isolated dc2.1 reached {other}"
        );
    }
    assert!(lab.reachable("dc1.1-h1", DC12_H1));
    assert!(lab.reachable("dc1.1-h1", CLOUD_H1));
    // Inside the isolated site, hosts still talk.
    assert!(lab.reachable("dc2.1-h1", Ipv4Addr::new(10, 77, 3, 12)));
    lab.ok(&["lab", "site", "restore", "dc2.1"]);
    assert!(lab.reachable("dc2.1-h1", DC11_H1));
}

#[test]
fn link_set_changes_delay_on_the_running_emulator() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2eset");
    lab.up();
    let pid_before = lab.status()["emulator"]["pid"].clone();
    lab.ok(&["lab", "link", "set", "dc1.1", "dc1.2", "--delay", "3"]);
    let rtt = dczone_lab::probe::measure_rtt(&lab.ns("dc1.1-h1"), DC12_H1, 30, Duration::ZERO)
        .expect("rtt");
    assert!(
        (5.8..7.0).contains(&rtt.median_ms),
        "RTT after --delay 3 was {} ms",
        rtt.median_ms
    );
    assert_eq!(
        lab.status()["emulator"]["pid"],
        pid_before,
        "emulator restarted"
    );
    let out = lab.run(&[
        "lab",
        "link",
        "set",
        "dc1.1",
        "dc1.2",
        "--bandwidth",
        "10 gbps",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--bandwidth") && err.contains("10Gbit"),
        "{err}"
    );
}

#[test]
fn status_lists_hosts_links_and_emulator() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2estat");
    lab.up();
    // `up` again is a no-op on a healthy lab.
    assert!(lab.ok(&["lab", "up"]).contains("already up"));
    let s = lab.status();
    let hosts = s["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 9);
    let h = hosts.iter().find(|h| h["id"] == "dc2.1-h1").unwrap();
    assert_eq!(h["site"], "dc2.1");
    assert_eq!(h["namespace"], "e2estat-dc2.1-h1");
    assert_eq!(h["ip"], "10.77.3.11");
    assert_eq!(s["emulator"]["alive"], true);
    assert_eq!(s["links"].as_array().unwrap().len(), 8);
    let out = lab.run(&["lab", "exec", "dc1.1-h1", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = lab.run(&["lab", "exec", "dc9-h1", "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown host 'dc9-h1'"));
}

fn lab_leftovers(name: &str) -> Vec<String> {
    let mut left: Vec<String> = sys::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{name}-")))
        .collect();
    let cmdline_mentions = |pid: &str| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&format!("dczone-test-{name}/")))
            .unwrap_or(false)
    };
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid.chars().all(|c| c.is_ascii_digit()) && cmdline_mentions(&pid) {
            left.push(format!("process {pid}"));
        }
    }
    left
}

#[test]
fn down_cleans_up_after_kill_9_of_the_emulator_and_of_up() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2edown");
    lab.up();
    let pid = lab.status()["emulator"]["pid"].as_i64().unwrap() as i32;
    sys::kill(pid, 9);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(lab.status()["emulator"]["alive"], false);
    lab.ok(&["lab", "down"]);
    assert_eq!(lab_leftovers("e2edown"), Vec::<String>::new());
    // Down twice is fine.
    lab.ok(&["lab", "down"]);

    // kill -9 of `lab up` while it builds.
    let mut child = lab.command().args(["lab", "up"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(60));
    let _ = child.kill();
    let _ = child.wait();
    lab.ok(&["lab", "down"]);
    assert_eq!(lab_leftovers("e2edown"), Vec::<String>::new());
    // And a lab comes up cleanly afterwards, and goes down as cleanly.
    lab.up();
    assert!(lab.reachable("dc1.1-h1", DC12_H1));
    lab.ok(&["lab", "down"]);
    assert_eq!(lab_leftovers("e2edown"), Vec::<String>::new());
}

#[test]
fn bad_zone_file_names_the_file_and_field() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2ezone");
    let file = lab.state_dir.with_extension("toml");
    std::fs::write(
        &file,
        dczone_zone_text().replace("bandwidth = \"25Gbit\"", "bandwidth = \"10 gbps\""),
    )
    .unwrap();
    let out = lab.run(&["lab", "up", "--zone", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(err.contains("links[0].bandwidth"), "{err}");
    assert!(sys::namespaces().iter().all(|n| !n.starts_with("e2ezone-")));
    let _ = std::fs::remove_file(file);
}

#[test]
fn without_privileges_the_error_names_the_capability() {
    if !e2e_enabled() {
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_dczone"))
        .args([
            "--lab",
            "e2epriv",
            "--state-dir",
            "/tmp/dczone-e2epriv",
            "lab",
            "up",
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
}

fn dczone_zone_text() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dczone"))
        .args(["zone", "show"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Stops every etcd member of the lab, for a test that needs etcd's client port.
fn stop_lab_etcd(lab: &TestLab) {
    let etcd_dir = lab.state_dir.join(&lab.name).join("etcd");
    for entry in std::fs::read_dir(&etcd_dir).expect("the lab runs etcd") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pid") {
            let pid: i32 = std::fs::read_to_string(&path)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // SAFETY: killing a process of our own lab by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let t = Instant::now();
            while sys::alive(pid) && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn ha_control_traffic_overtakes_a_saturating_bulk_flow() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2eprio");
    lab.up();
    // The echo server takes etcd's client port on dc2.1-h2, where the zone places an etcd
    // member. The lab's consensus store plays no part here: stop all of it. (With only
    // dc2.1-h2's member stopped, the other four kept the lab's paths at ~35 Mbit/s and
    // +25 ms: not understood yet, see BENCHMARKS.md "Regional disaster".)
    stop_lab_etcd(&lab);
    // A bulk TCP flow fills the DC1.1 -> DC2.1 path (5 ms RTT) and its queue.
    let (a, b) = (lab.ns("dc1.1-h1"), lab.ns("dc2.1-h1"));
    let bulk = std::thread::spawn(move || {
        dczone_lab::probe::measure_tcp(&a, &b, DC21_H1, Duration::from_secs(8), Duration::ZERO)
    });
    std::thread::sleep(Duration::from_secs(2));
    let dc21_h2 = Ipv4Addr::new(10, 77, 3, 12);
    // etcd's client port takes the strict-priority class; any other port queues.
    let control = tcp_echo_median_on(&lab, "dc1.1-h2", "dc2.1-h2", dc21_h2, 2379);
    let other = tcp_echo_median_on(&lab, "dc1.1-h2", "dc2.1-h2", dc21_h2, 7007);
    let tput = bulk.join().unwrap().expect("bulk flow");
    eprintln!("echo behind a bulk flow: control {control:?}, other {other:?}; bulk {tput:?}");
    assert!(
        control < Duration::from_micros(6_500),
        "HA control echo took {control:?} behind bulk traffic ({tput:?})"
    );
    // The test proves something only if the bulk flow built a queue that the control
    // class skipped. How deep that queue gets depends on the bulk flow's window, which a
    // busy shared host varies (CI once saw only 2.7 ms): a millisecond is enough to tell.
    assert!(
        other > control + Duration::from_millis(1),
        "bulk-class echo {other:?} vs control {control:?}: the bulk flow did not queue"
    );
}

#[test]
fn bulk_transfers_have_a_lane_of_their_own_on_the_apn_and_share_a_conventional_wan() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2elane");
    lab.up();
    let api = dczone_lab::Lab::new(
        &lab.name,
        &lab.state_dir,
        std::path::Path::new(env!("CARGO_BIN_EXE_dczone")),
    )
    .unwrap();
    // An APN link refuses jitter: that is what a conventional WAN is for.
    let out = lab.run(&["lab", "link", "set", "dc1.1", "dc2.1", "--jitter", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--wan conventional"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo_behind_bulk = || {
        let bulk = api.cross_traffic("dc1.1-h2", "dc2.1-h2", 4).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let echo = tcp_echo_median(&lab, "dc1.1-h1", "dc2.1-h1", DC21_H1);
        (echo, bulk.stop())
    };
    let (apn, apn_bulk) = echo_behind_bulk();
    lab.ok(&["lab", "wan", "conventional"]);
    let links = lab.status()["links"].as_array().unwrap().clone();
    assert!(links.iter().all(|l| l["deterministic"] == false
        && l["jitter_ms"].as_f64().unwrap() > 0.0
        && l["loss_percent"].as_f64().unwrap() > 0.0));
    let (conventional, conventional_bulk) = echo_behind_bulk();
    lab.ok(&["lab", "wan", "apn"]);
    eprintln!(
        "echo behind bulk flows: APN {apn:?} ({apn_bulk:?}), conventional {conventional:?} \
         ({conventional_bulk:?})"
    );
    // The bulk flows moved data in both cases (lab rate of 25 Gbit/s / 64 = 390 Mbit/s).
    assert!(apn_bulk.lab_mbit > 100.0 && conventional_bulk.lab_mbit > 50.0);
    // Conventional: the same echo queues behind them.
    assert!(
        conventional > apn + Duration::from_millis(3),
        "conventional echo {conventional:?} vs APN {apn:?}: the bulk flows did not share the pipe"
    );
    // APN: the database's path keeps its 5 ms round trip behind the bulk flows, give or
    // take what two busy cores add to the emulator's turn (2-3.6 ms measured): at most
    // half of what the conventional WAN's queue adds (one shared pipe would add as much).
    let rtt = Duration::from_millis(5);
    assert!(
        apn < rtt + conventional.saturating_sub(rtt) / 2,
        "APN echo {apn:?} behind bulk flows on their own lane (conventional {conventional:?})"
    );
    let links = lab.status()["links"].as_array().unwrap().clone();
    assert!(links.iter().all(|l| l["deterministic"] == true));
}

/// `dczone ... | head`: a reader that went away ends the command with a shell's SIGPIPE
/// status (141) and nothing on stderr, not a panic (Rust ignores SIGPIPE, and dczone keeps
/// it so for its TLS connections).
#[test]
fn a_reader_that_went_away_ends_the_command_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_dczone"))
        .args(["zone", "show"])
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(err.is_empty(), "{err}");
}
