//! End-to-end tests of the zone's storage: real Ceph clusters brought up through the lab
//! hosts' agents, and VMs whose disks are RBD images in them. Gated by `DCZONE_E2E=1`;
//! need `scripts/build` and `scripts/deps` (Ceph).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dczone_lab::sys;

mod common;

use common::{e2e_enabled, guest_ip, TestLab};

/// One connection to a guest's ledger from `host`.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    fn connect(ip: Ipv4Addr) -> Client {
        let s = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), Duration::from_secs(10))
            .expect("connect to the guest ledger");
        // A write waits for its replicas: an OSD's loss stalls it until the OSD is marked
        // down (seconds), and a restarted VM first takes its image's lock from the dead one.
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    fn ask(&mut self, req: &str) -> String {
        writeln!(self.w, "{req}").unwrap_or_else(|e| panic!("send {req}: {e}"));
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("answer to {req}: {e}"));
        line.trim().to_string()
    }
}

fn ask_from(lab: &TestLab, host: &str, ip: Ipv4Addr, requests: Vec<String>) -> Vec<String> {
    sys::in_namespace(&lab.ns(host), move || {
        let mut c = Client::connect(ip);
        requests.iter().map(|r| c.ask(r)).collect::<Vec<_>>()
    })
    .unwrap()
    .join()
    .unwrap()
}

/// [`ask_from`] once the guest's ledger accepts connections again (a restarted VM), within
/// 60 s.
fn ask_once_serving(
    lab: &TestLab,
    host: &str,
    ip: Ipv4Addr,
    requests: Vec<String>,
    what: &str,
) -> Vec<String> {
    let t = Instant::now();
    loop {
        let reachable = sys::in_namespace(&lab.ns(host), move || {
            TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), Duration::from_secs(2))
                .is_ok()
        })
        .unwrap()
        .join()
        .unwrap();
        if reachable {
            return ask_from(lab, host, ip, requests);
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what} never served again"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn field<'a>(stats: &'a str, key: &str) -> &'a str {
    stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {stats}"))
}

/// From `host`, transfers of 1 between accounts `from_to` back to back on one connection,
/// ids from `first`, until `stop`; each must be answered `OK`. The acknowledged ids, each
/// with when its answer came.
fn writer(
    lab: &TestLab,
    host: &str,
    ip: Ipv4Addr,
    first: u64,
    (from, to): (usize, usize),
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(u64, Instant)>> {
    sys::in_namespace(&lab.ns(host), move || {
        let mut c = Client::connect(ip);
        let mut acked = Vec::new();
        for id in first.. {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let answer = c.ask(&format!("T {id} {from} {to} 1"));
            assert_eq!(answer, format!("OK {id}"), "transfer {id}");
            acked.push((id, Instant::now()));
        }
        acked
    })
    .unwrap()
}

/// How long DC1.1 stays cut off in the site-loss step: the remaining monitors elect a
/// leader, mark DC1.1's OSDs down and enter degraded stretch mode, after which DC1.2 takes
/// the writes (16 s in `bench storage`).
const SITE_LOSS_HOLD: Duration = Duration::from_secs(30);

/// Waits until every cluster's PGs are all active (none peering, down or stale).
fn wait_all_pgs_active(lab: &TestLab, timeout: Duration) {
    let t = Instant::now();
    loop {
        let status = lab.json(&["storage", "status", "--json"]);
        let all_active = status.as_array().is_some_and(|cs| {
            cs.iter().all(|c| {
                c["status"]["pg_states"].as_array().is_some_and(|states| {
                    states
                        .iter()
                        .all(|s| s[0].as_str().is_some_and(|n| n.starts_with("active")))
                })
            })
        });
        if all_active {
            return;
        }
        assert!(
            t.elapsed() < timeout,
            "PGs not all active after {timeout:?}: {status}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn checksum(balances: &[i64]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in balances.iter().flat_map(|b| b.to_le_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn stderr_of(lab: &TestLab, args: &[&str]) -> String {
    let out = lab.run(args);
    assert!(!out.status.success(), "dczone {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn vm_disks_on_the_stretched_cluster_survive_an_osd_loss_a_migration_and_a_restart() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2esto");
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    lab.up();
    step("lab up");

    // Both clusters through the agents: region 1 stretched with its tiebreaker at the
    // witness, DC2.1 on its own.
    let up = lab.json(&["storage", "up", "--json"]);
    let up = up.as_array().unwrap();
    assert_eq!(up.len(), 2);
    let r1 = &up[0];
    assert_eq!(r1["cluster"], "region-1");
    assert_eq!(r1["created"], true);
    assert_eq!(r1["status"]["stretch_mode"], true, "{r1}");
    assert_eq!(r1["status"]["quorum"].as_array().unwrap().len(), 5);
    assert_eq!(r1["status"]["osds_up"], 4);
    assert_eq!(up[1]["cluster"], "region-2");
    assert_eq!(up[1]["status"]["osds_up"], 2);
    step("storage up");
    // Run again, it finds both and starts nothing.
    let again = lab.json(&["storage", "up", "--json"]);
    for c in again.as_array().unwrap() {
        assert_eq!(c["created"], false);
        assert_eq!(c["started"].as_array().unwrap().len(), 0, "{c}");
    }

    step("storage up again");
    // Bad input.
    let small = stderr_of(
        &lab,
        &[
            "vm", "create", "tiny", "--host", "dc1.1-h1", "--disk", "5MiB",
        ],
    );
    assert!(small.contains("outside 64-"), "{small}");
    let unit = stderr_of(
        &lab,
        &[
            "vm", "create", "tiny", "--host", "dc1.1-h1", "--disk", "5XB",
        ],
    );
    assert!(unit.contains("unknown unit"), "{unit}");
    let nowhere = stderr_of(
        &lab,
        &["vm", "create", "tiny", "--host", "dc1.1-client", "--disk"],
    );
    assert!(
        nowhere.contains("no storage cluster on dc1.1-client"),
        "{nowhere}"
    );
    let bad_daemon = stderr_of(&lab, &["storage", "stop", "osd.9", "--cluster", "region-1"]);
    assert!(bad_daemon.contains("has no osd.9"), "{bad_daemon}");

    let vm = lab.json(&[
        "vm", "create", "ledger", "--host", "dc1.1-h1", "--disk", "--json",
    ]);
    assert_eq!(vm["spec"]["disk"]["cluster"], "region-1");
    assert_eq!(vm["spec"]["disk"]["size_mib"], 1536);
    let ip = guest_ip(&vm);
    let first = ask_from(
        &lab,
        "dc1.1-client",
        ip,
        vec![
            "T 1 0 1 25".into(),
            "T 1 0 1 25".into(),
            "B 1".into(),
            "S".into(),
        ],
    );
    assert_eq!(first[0], "OK 1");
    assert_eq!(first[1], "DUP 1", "a retried transfer must apply once");
    assert_eq!(first[2], "1025");
    let boot = field(&first[3], "boot").to_string();
    assert_eq!(field(&first[3], "journal"), "1");

    // Bad input for a migration: the same host, an unknown VM, an unknown host.
    let same = stderr_of(&lab, &["migrate", "ledger", "--to", "dc1.1-h1"]);
    assert!(same.contains("already on host dc1.1-h1"), "{same}");
    let unknown = stderr_of(&lab, &["migrate", "nope", "--to", "dc1.2-h1"]);
    assert!(unknown.contains("unknown VM 'nope'"), "{unknown}");
    let bad_host = stderr_of(&lab, &["migrate", "ledger", "--to", "dc9-h1"]);
    assert!(bad_host.contains("unknown host 'dc9-h1'"), "{bad_host}");

    // A client sends transfers back to back while one OSD of DC1.1 dies, then while the VM
    // moves to DC1.2 (its disk is shared: memory only). Every transfer is answered OK.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        sys::in_namespace(&lab.ns("dc1.1-client"), move || {
            let mut c = Client::connect(ip);
            let mut acked = vec![(1, 0, 1, 25, Instant::now())];
            for id in 100u64.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (from, to, amount) = ((id % 10) as usize, ((id * 7 + 3) % 10) as usize, id % 5);
                let answer = c.ask(&format!("T {id} {from} {to} {amount}"));
                assert_eq!(answer, format!("OK {id}"), "transfer {id}");
                acked.push((id, from, to, amount as i64, Instant::now()));
            }
            acked
        })
        .unwrap()
    };
    std::thread::sleep(Duration::from_secs(2));
    step("VM up, load running");
    lab.ok(&["storage", "stop", "osd.0", "--cluster", "region-1"]);
    let t = Instant::now();
    let degraded = loop {
        let s = lab.json(&["storage", "status", "--json"]);
        let r1 = s[0]["status"].clone();
        if r1["osds_up"] == 3 {
            break r1;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "osd.0 never marked down: {s}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(degraded["osds"], 4);
    step("osd.0 down");
    std::thread::sleep(Duration::from_secs(2));
    let migrating = Instant::now();
    let m = lab.json(&["migrate", "ledger", "--to", "dc1.2-h1", "--json"]);
    let migrated = Instant::now();
    let rec = &m["vms"][0];
    let (t1, t2) = (
        rec["t1_ms"].as_f64().unwrap(),
        rec["t2_ms"].as_f64().unwrap(),
    );
    assert!(t1 > 0.0 && t2 > 0.0, "T1 {t1} ms, T2 {t2} ms");
    assert!(t2 < 1000.0, "downtime of a 256 MiB guest was {t2} ms");
    assert!(
        rec["qemu_downtime_ms"].as_f64().unwrap() <= t2 + 1.0,
        "QEMU's downtime must lie within T2"
    );
    assert_eq!(m["svc_t2_ms"], rec["t2_ms"]);
    // The stream between the sites was TLS with the hosts' certificates.
    assert_eq!(rec["tls"], true, "{rec}");
    step("migrated");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let acked = load.join().expect("every transfer was answered OK");
    assert!(acked.len() >= 50, "only {} transfers", acked.len());
    let during = acked
        .iter()
        .filter(|t| t.4 > migrating && t.4 < migrated)
        .count();
    assert!(during >= 10, "only {during} transfers during the migration");
    let acked: Vec<(u64, usize, usize, i64)> = acked
        .into_iter()
        .map(|(i, f, t, a, _)| (i, f, t, a))
        .collect();

    let mut balances = vec![1000i64; 1000];
    for &(_, from, to, amount) in &acked {
        balances[from] -= amount;
        balances[to] += amount;
    }
    let after = ask_from(&lab, "dc1.1-client", ip, vec!["C".into(), "S".into()]);
    assert_eq!(field(&after[1], "boot"), boot, "the guest rebooted");
    assert_eq!(field(&after[1], "checksum"), checksum(&balances));
    assert_eq!(
        after[0],
        format!("CP {} {}", acked.len(), checksum(&balances)),
        "the checkpoint's journal position and state"
    );
    let processed = |s: &str| field(s, "processed").parse::<u64>().unwrap();
    assert_eq!(
        processed(&after[1]),
        processed(&first[3]) + acked.len() as u64 - 1,
        "requests lost or replayed"
    );

    // Within a site the stream stays in the clear.
    let within = lab.json(&["migrate", "ledger", "--to", "dc1.2-h2", "--json"]);
    assert_eq!(within["vms"][0]["tls"], false, "{within}");
    // A host whose certificate is another zone's cannot receive a VM: the source's QEMU
    // refuses the handshake and the VM runs on at its source.
    let other = lab.state_dir.join("other-zone-pki");
    let _ = std::fs::remove_dir_all(&other);
    let o = other.display().to_string();
    lab.ok(&["pki", "init", "--dir", &o, "--zone", "other"]);
    lab.ok(&[
        "pki",
        "issue",
        "dc1.1-h1",
        "--dir",
        &o,
        "--ip",
        "10.77.1.11",
    ]);
    let hosts = lab.state_dir.join(&lab.name).join("pki/hosts");
    for ext in ["crt", "key"] {
        let ours = hosts.join(format!("dc1.1-h1.{ext}"));
        std::fs::rename(&ours, hosts.join(format!("dc1.1-h1.{ext}.ours"))).unwrap();
        std::fs::copy(other.join(format!("hosts/dc1.1-h1.{ext}")), &ours).unwrap();
    }
    let refused = stderr_of(&lab, &["migrate", "ledger", "--to", "dc1.1-h1"]);
    assert!(refused.contains("keeps running"), "{refused}");
    assert_eq!(lab.json(&["vm", "list", "--json"])[0]["host"], "dc1.2-h2");
    let serving = ask_from(&lab, "dc1.1-client", ip, vec!["S".into()]);
    assert_eq!(field(&serving[0], "boot"), boot);
    for ext in ["crt", "key"] {
        let ours = hosts.join(format!("dc1.1-h1.{ext}"));
        std::fs::rename(hosts.join(format!("dc1.1-h1.{ext}.ours")), &ours).unwrap();
    }
    let back = lab.json(&["migrate", "ledger", "--to", "dc1.1-h1", "--json"]);
    assert_eq!(back["vms"][0]["tls"], true, "{back}");
    step("moved within a site, refused by another zone's host, and back");

    // Powered off and on again (a crash: QEMU killed), the VM replays its journal: every
    // acknowledged transfer is there, and a retried one is not applied twice.
    step("checkpoint");
    lab.ok(&["vm", "stop", "ledger"]);
    lab.ok(&["vm", "start", "ledger"]);
    let mut retry: Vec<String> = vec!["S".into()];
    retry.extend(
        acked
            .iter()
            .map(|&(id, from, to, amount)| format!("T {id} {from} {to} {amount}")),
    );
    retry.push("S".into());
    let replayed = ask_once_serving(&lab, "dc1.1-client", ip, retry, "the restarted VM");
    assert_ne!(field(&replayed[0], "boot"), boot, "it did restart");
    assert_eq!(field(&replayed[0], "replayed"), acked.len().to_string());
    assert_eq!(field(&replayed[0], "checksum"), checksum(&balances));
    for (answer, &(id, ..)) in replayed[1..].iter().zip(&acked) {
        assert_eq!(*answer, format!("DUP {id}"), "transfer {id} was lost");
    }
    assert_eq!(
        field(replayed.last().unwrap(), "checksum"),
        checksum(&balances)
    );

    step("replayed and retried");

    // Backups to DC2.1's store: a full one of a disk with 16 MiB of data, then an
    // incremental one, each at the guest's checkpoint.
    let client = "dc1.1-client";
    assert_eq!(
        ask_from(&lab, client, ip, vec!["F 16".into()])[0],
        "FILLED 16"
    );
    let full = lab.json(&["backup", "create", "ledger", "--to", "dc2.1", "--json"]);
    assert_eq!(full["full"], true, "{full}");
    assert_eq!(full["checkpoint"], acked.len() as u64, "{full}");
    assert!(full["bytes"].as_u64().unwrap() >= 16 << 20, "{full}");
    assert!(full["chunks"].as_u64().unwrap() >= 4, "{full}");
    let (most, mean) = (
        full["most_delayed_arrival_ms"].as_f64().unwrap(),
        full["mean_arrival_ms"].as_f64().unwrap(),
    );
    assert!(most >= mean && mean > 0.0, "{full}");
    assert!(full["t1_ms"].as_f64().unwrap() > 0.0 && full["t2_ms"].as_f64().unwrap() > 0.0);
    let mut log: Vec<String> = acked
        .iter()
        .map(|(i, f, t, a)| format!("T {i} {f} {t} {a}"))
        .collect();
    let more = |ids: std::ops::Range<u64>, log: &mut Vec<String>| {
        let reqs: Vec<String> = ids.map(|i| format!("T {i} 3 4 2")).collect();
        for (a, r) in ask_from(&lab, client, ip, reqs.clone()).iter().zip(&reqs) {
            assert!(a.starts_with("OK "), "{r}: {a}");
        }
        log.extend(reqs);
    };
    more(5000..5020, &mut log);
    let incr = lab.json(&["backup", "create", "ledger", "--to", "dc2.1", "--json"]);
    assert_eq!(incr["full"], false, "{incr}");
    assert_eq!(incr["parent"], full["id"]);
    assert_eq!(incr["checkpoint"], log.len() as u64);
    assert!(incr["bytes"].as_u64().unwrap() < 4 << 20, "{incr}");
    // Acknowledged after the last backup: only the clients' log holds these.
    more(6000..6010, &mut log);
    step("full and incremental backups");

    // A backup whose path is cut fails and leaves the store as it was; the next one runs.
    lab.ok(&["lab", "site", "isolate", "dc2.1"]);
    let cut = stderr_of(&lab, &["backup", "create", "ledger", "--to", "dc2.1"]);
    step("cut");
    lab.ok(&["lab", "site", "restore", "dc2.1"]);
    assert!(cut.contains("back up VM ledger to dc2.1"), "{cut}");
    let listed = lab.json(&["backup", "list", "--at", "dc2.1", "--json"]);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [full["id"].as_str().unwrap(), incr["id"].as_str().unwrap()]
    );
    let store = lab.state_dir.join(&lab.name).join("ceph/dc2.1-h1/region-2");
    let rados = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns("dc2.1-h1"), "rados", "-c"])
            .arg(store.join("ceph.conf"))
            .args(["-n", "client.admin", "-k"])
            .arg(store.join("keyring.client.admin"))
            .args(["-p", "backups"])
            .args(args)
            .output()
            .unwrap()
    };
    // A full store (its pool's quota reached) refuses a backup before its snapshot, saying
    // what to do; Ceph itself would hold the writes until they time out. So does a site
    // without room for a restore, before any image is made.
    let quota = |pool: &str, bytes: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns("dc2.1-h1"), "ceph", "-c"])
            .arg(store.join("ceph.conf"))
            .args(["-n", "client.admin", "-k"])
            .arg(store.join("keyring.client.admin"))
            .args(["osd", "pool", "set-quota", pool, "max_bytes", bytes])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    // Whether `image` is in pool rbd of `cluster`, asked from `host` (an answer other
    // than "no such image" fails the test: it would prove nothing).
    let rbd_info = |host: &str, cluster: &str, image: &str| {
        let dir = lab
            .state_dir
            .join(&lab.name)
            .join("ceph")
            .join(host)
            .join(cluster);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns(host), "rbd", "-c"])
            .arg(dir.join("ceph.conf"))
            .args(["--id", "vm", "info"])
            .arg(format!("rbd/{image}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || stderr.contains("No such file or directory"),
            "rbd info rbd/{image} in {cluster}: {stderr}"
        );
        out.status.success()
    };
    let snapshots = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns("dc1.1-h1"), "rbd", "-c"])
            .arg(
                lab.state_dir
                    .join(&lab.name)
                    .join("ceph/dc1.1-h1/region-1/ceph.conf"),
            )
            .args(["--id", "vm", "snap", "ls", "rbd/vm-ledger"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let before = snapshots();
    quota("backups", "1");
    let full_store = stderr_of(&lab, &["backup", "create", "ledger", "--to", "dc2.1"]);
    quota("backups", "0");
    assert!(
        full_store.contains("the backup store at dc2.1 is full")
            && full_store.contains("pool backups of cluster region-2 is full (quota 1 B")
            && full_store.contains("dczone backup delete")
            && full_store.contains("ceph osd pool set-quota backups max_bytes"),
        "{full_store}"
    );
    assert_eq!(snapshots(), before, "a refused backup took a snapshot");
    quota("rbd", "1");
    let no_room = stderr_of(
        &lab,
        &[
            "backup", "restore", "ledger", "--at", "dc2.1", "--as", "ledger2",
        ],
    );
    quota("rbd", "0");
    assert!(
        no_room.contains("pool rbd of cluster region-2 can take 0 B more")
            && no_room.contains("dczone vm destroy"),
        "{no_room}"
    );
    assert!(
        !rbd_info("dc2.1-h1", "region-2", "vm-ledger2"),
        "a restore without room made an image"
    );
    assert!(lab.run(&["vm", "show", "ledger2"]).status.code() != Some(0));
    step("a full store and a site without room refused");

    // What a transfer cut half-way leaves: chunks without a manifest. The next backup of
    // the VM removes them; another VM's are not its to touch.
    assert!(rados(&["put", "ledger-1.0", "/etc/hostname"])
        .status
        .success());
    assert!(rados(&["put", "ledger2x-1.0", "/etc/hostname"])
        .status
        .success());
    let next = lab.json(&["backup", "create", "ledger", "--to", "dc2.1", "--json"]);
    assert_eq!(next["parent"], incr["id"], "{next}");
    assert!(next["chunks"].as_u64().unwrap() >= 1, "{next}");
    // No chunk of the cut transfer is left in the store.
    let objects = String::from_utf8(rados(&["ls"]).stdout).unwrap();
    assert!(
        !objects.lines().any(|o| o == "ledger-1.0"),
        "the orphan stayed"
    );
    assert!(
        objects.lines().any(|o| o == "ledger2x-1.0"),
        "another VM's orphan went"
    );
    assert!(rados(&["rm", "ledger2x-1.0"]).status.success());
    let objects = String::from_utf8(rados(&["ls"]).stdout).unwrap();
    for o in objects.lines() {
        let id = o.rsplit_once('.').unwrap().0;
        assert!(
            objects.lines().any(|x| x == format!("{id}.manifest")),
            "orphan {o}"
        );
    }
    step("a cut backup, and the next");

    // A damaged chunk: verify and restore name it, and nothing is restored.
    let damaged = next["id"].as_str().unwrap();
    assert!(rados(&["put", &format!("{damaged}.0"), "/etc/hostname"])
        .status
        .success());
    let v = stderr_of(&lab, &["backup", "verify", damaged, "--at", "dc2.1"]);
    assert!(
        v.contains(&format!("backup {damaged} is damaged at chunk 0")),
        "{v}"
    );
    let r = stderr_of(
        &lab,
        &[
            "backup", "restore", "ledger", "--at", "dc2.1", "--as", "ledger2",
        ],
    );
    assert!(r.contains("damaged at chunk 0"), "{r}");
    step("a damaged backup refused");
    assert!(lab.run(&["vm", "show", "ledger2"]).status.code() != Some(0));
    assert!(
        !rbd_info("dc2.1-h1", "region-2", "vm-ledger2"),
        "a refused restore made an image"
    );
    lab.ok(&["backup", "delete", damaged, "--at", "dc2.1"]);

    // Recovery at DC2.1 from the incremental backup, then the clients' log replayed:
    // RPO = 0, whatever the snapshot missed.
    let replay = lab.state_dir.join("replay.log");
    std::fs::write(&replay, log.join("\n")).unwrap();
    let restored = lab.json(&[
        "backup",
        "restore",
        "ledger",
        "--at",
        "dc2.1",
        "--as",
        "ledger2",
        "--replay",
        replay.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        restored["chain"],
        serde_json::json!([full["id"], incr["id"]]),
        "{restored}"
    );
    step(&format!(
        "restore: trecovery {} ms, volume {} ms, boot {} ms",
        restored["trecovery_ms"], restored["volume_ms"], restored["boot_ms"]
    ));
    assert_eq!(restored["replayed"], 10, "{restored}");
    assert_eq!(restored["present"], (log.len() - 10) as u64);
    assert_eq!(restored["refused"], 0);
    assert!(restored["trecovery_ms"].as_f64().unwrap() >= restored["boot_ms"].as_f64().unwrap());
    let vm2 = lab.json(&["vm", "show", "ledger2", "--json"]);
    assert_eq!(vm2["spec"]["disk"]["cluster"], "region-2");
    let ip2 = guest_ip(&vm2);
    let mut all = balances.clone();
    for (f, t, a) in [(3usize, 4usize, 2i64)].repeat(30) {
        all[f] -= a;
        all[t] += a;
    }
    let s1 = ask_from(&lab, client, ip, vec!["S".into()]);
    let s2 = ask_from(&lab, "dc2.1-h2", ip2, vec!["S".into()]);
    assert_eq!(field(&s1[0], "checksum"), checksum(&all));
    assert_eq!(
        field(&s2[0], "checksum"),
        checksum(&all),
        "the restored VM lost a transfer"
    );
    step("checked");
    lab.ok(&["vm", "destroy", "ledger2"]);
    step("restored at DC2.1 with the log replayed");

    // Across regions the disk goes along (DC2.1 is another cluster): mirrored over NBD
    // into a new image there while the VM runs. A path cut during the copy leaves the VM
    // at its source, and no copy behind.
    assert_eq!(
        ask_from(&lab, client, ip, vec!["F 200".into()])[0],
        "FILLED 200"
    );
    let cut = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(4));
            lab.ok(&["lab", "site", "isolate", "dc2.1"]);
        });
        stderr_of(&lab, &["migrate", "ledger", "--to", "dc2.1-h1"])
    });
    lab.ok(&["lab", "site", "restore", "dc2.1"]);
    assert!(cut.contains("keeps running"), "{cut}");
    assert_eq!(
        lab.json(&["vm", "show", "ledger", "--json"])["host"],
        "dc1.1-h1"
    );
    let serving = ask_from(&lab, client, ip, vec!["S".into()]);
    assert_eq!(field(&serving[0], "checksum"), checksum(&all));
    let t = Instant::now();
    while rbd_info("dc2.1-h1", "region-2", "vm-ledger") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the aborted copy's image stayed in region-2"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    step("a cut inter-region migration: the VM stays, no copy is left");

    // Then it moves, under a client's load, with its journal.
    let stop = Arc::new(AtomicBool::new(false));
    let load = writer(&lab, client, ip, 7000, (5, 6), stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let m = lab.json(&["migrate", "ledger", "--to", "dc2.1-h1", "--json"]);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let moved = load.join().expect("every transfer was answered OK");
    let rec = &m["vms"][0];
    step(&format!(
        "inter-region: T1 {} ms, T2 {} ms, disk {}",
        rec["t1_ms"], rec["t2_ms"], rec["disk"]
    ));
    assert_eq!(rec["disk"]["from_cluster"], "region-1", "{rec}");
    assert_eq!(rec["disk"]["to_cluster"], "region-2", "{rec}");
    assert_eq!(rec["disk"]["source_removed"], true, "{rec}");
    assert!(rec["disk"]["copy_ms"].as_f64().unwrap() > 0.0, "{rec}");
    assert!(
        rec["t1_ms"].as_f64().unwrap() >= rec["disk"]["copy_ms"].as_f64().unwrap(),
        "T1 counts the copy: {rec}"
    );
    assert!(rec["t2_ms"].as_f64().unwrap() < 1000.0, "{rec}");
    assert_eq!(rec["tls"], true, "{rec}");
    assert!(moved.len() >= 10, "only {} transfers", moved.len());
    let vm = lab.json(&["vm", "show", "ledger", "--json"]);
    assert_eq!(vm["host"], "dc2.1-h1");
    assert_eq!(vm["spec"]["disk"]["cluster"], "region-2");
    assert!(rbd_info("dc2.1-h1", "region-2", "vm-ledger"));
    assert!(
        !rbd_info("dc1.1-h1", "region-1", "vm-ledger"),
        "the source's image stayed"
    );
    all[5] -= moved.len() as i64;
    all[6] += moved.len() as i64;
    // Its disk at DC2.1 holds every acknowledged transfer: a crash there replays them all.
    lab.ok(&["vm", "stop", "ledger"]);
    lab.ok(&["vm", "start", "ledger"]);
    let after = ask_once_serving(&lab, client, ip, vec!["S".into()], "the VM at DC2.1");
    assert_eq!(
        field(&after[0], "checksum"),
        checksum(&all),
        "a transfer acknowledged before or during the migration is missing at DC2.1"
    );
    step("moved to DC2.1 with its disk, restarted there with every transfer");
    lab.ok(&["vm", "destroy", "ledger"]);
    step("destroyed");

    // DC1.1 lost (cut off from every site) under writes from a client of DC1.2 to a VM of
    // DC1.2 whose disk is in the stretched cluster: once DC1.1's OSDs are marked down, the
    // copies in DC1.2 take the writes, and no acknowledged transfer is lost.
    let survivor = lab.json(&[
        "vm", "create", "survivor", "--host", "dc1.2-h1", "--disk", "--json",
    ]);
    // Its disk is in DC1.2's pool, whose every PG has its primary in DC1.2 (osd.2, osd.3):
    // DC1.2's VMs read from their own site.
    assert_eq!(survivor["spec"]["disk"]["pool"], "rbd-dc1.2", "{survivor}");
    let pgs = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("dc1.2-h1"), "ceph", "-c"])
        .arg(
            lab.state_dir
                .join(&lab.name)
                .join("ceph/dc1.2-h1/region-1/ceph.conf"),
        )
        .args(["pg", "ls-by-pool", "rbd-dc1.2", "-f", "json"])
        .output()
        .unwrap();
    assert!(pgs.status.success(), "{pgs:?}");
    let pgs: serde_json::Value = serde_json::from_slice(&pgs.stdout).unwrap();
    let primaries: Vec<u64> = pgs["pg_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["acting_primary"].as_u64().unwrap())
        .collect();
    assert!(
        !primaries.is_empty() && primaries.iter().all(|o| [2, 3].contains(o)),
        "primaries of rbd-dc1.2: {primaries:?}"
    );
    let ip1 = guest_ip(&survivor);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(&lab, "dc1.2-h2", ip1, 1, (1, 2), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    lab.ok(&["lab", "site", "isolate", "dc1.1"]);
    std::thread::sleep(SITE_LOSS_HOLD);
    let cut_end = Instant::now();
    lab.ok(&["lab", "site", "restore", "dc1.1"]);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let acked = writes.join().expect("every transfer was answered OK");
    let late = acked
        .iter()
        .filter(|(_, at)| *at + Duration::from_secs(5) > cut_end && *at < cut_end)
        .count();
    assert!(
        late > 0,
        "no write was acknowledged in the last 5 s of DC1.1's loss ({} in all)",
        acked.len()
    );
    // The ledger in memory remembers what it applied whatever the disk kept: restarted,
    // it rebuilds itself from the journal on its disk, which is what must hold them all.
    // (Once DC1.1's OSDs have re-peered: a boot whose reads wait on peering PGs can miss
    // `vm start`'s 60 s, which is not what this checks.)
    wait_all_pgs_active(&lab, Duration::from_secs(180));
    lab.ok(&["vm", "stop", "survivor"]);
    lab.ok(&["vm", "start", "survivor"]);
    let mut again: Vec<String> = vec!["S".into()];
    again.extend(acked.iter().map(|(id, _)| format!("T {id} 1 2 1")));
    let again = ask_once_serving(&lab, "dc1.2-h2", ip1, again, "the restarted survivor");
    assert_eq!(
        field(&again[0], "replayed"),
        acked.len().to_string(),
        "the journal on the disk"
    );
    for (answer, (id, _)) in again[1..].iter().zip(&acked) {
        assert_eq!(
            *answer,
            format!("DUP {id}"),
            "transfer {id} was lost with DC1.1"
        );
    }
    step(&format!(
        "DC1.1 lost: DC1.2 served ({late} writes in its last 5 s), {} acknowledged, none lost",
        acked.len()
    ));
    // Down: a VM's image goes with it, then every daemon and file with the clusters.
    lab.ok(&["vm", "destroy", "survivor"]);
    let down = lab.json(&["storage", "down", "--json"]);
    for l in down.as_array().unwrap() {
        assert!(l["error"].is_null(), "{l}");
    }
    let ceph = lab.state_dir.join(&lab.name).join("ceph");
    let left: Vec<_> = std::fs::read_dir(&ceph)
        .map(|d| {
            d.flatten()
                .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    let pids = sys::pids_in_namespace(&lab.ns("dc1.1-h1"));
    let cephs: Vec<_> = pids
        .iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("ceph-"))
        })
        .collect();
    assert!(cephs.is_empty(), "ceph daemons left on dc1.1-h1: {cephs:?}");
    step("storage down");
    lab.ok(&["lab", "down"]);
}
