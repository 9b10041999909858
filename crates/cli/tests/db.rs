//! End-to-end tests of the database platform: real PostgreSQL 15 in three DC sites, real
//! etcd, HA agents, the APN emulator in between.

mod common;

use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{e2e_enabled, remote, TestLab};
use serde_json::Value;

const DC11: &str = "10.77.1.11";
const DC12: &str = "10.77.2.11";

fn status(lab: &TestLab) -> Value {
    lab.json(&["db", "status", "--json"])
}

/// Polls `db status` until `ok` holds.
fn wait_status(lab: &TestLab, what: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let out = lab.run(&["db", "status", "--json"]);
        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
            if ok(&v) {
                return v;
            }
            assert!(
                t.elapsed() < timeout,
                "{what}: not within {timeout:?}; status {v}"
            );
        } else {
            assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        }
        sleep(Duration::from_millis(200));
    }
}

/// Runs SQL with psql from `host` against `ip`; returns (success, stdout+stderr).
fn psql(lab: &TestLab, host: &str, ip: &str, sql: &str) -> (bool, String) {
    psql_with(lab, host, ip, sql, &[])
}

/// `curl ARGS` on `host`: whether it succeeded, and what it printed.
fn curl(lab: &TestLab, host: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["lab", "exec", host, "--", "curl", "-sS", "-m", "5"];
    all.extend_from_slice(args);
    outcome(lab.run(&all))
}

/// [`psql`] with `env` arguments first (`VAR=value`, or `-u VAR` to unset one).
fn psql_with(lab: &TestLab, host: &str, ip: &str, sql: &str, env: &[&str]) -> (bool, String) {
    let mut args = vec!["lab", "exec", host, "--", "env"];
    args.extend_from_slice(env);
    args.extend_from_slice(&[
        "timeout",
        "5",
        "runuser",
        "-u",
        "postgres",
        "--",
        "/usr/lib/postgresql/15/bin/psql",
        "-h",
        ip,
        "-d",
        "ledger",
        "-tAc",
        sql,
    ]);
    outcome(lab.run(&args))
}

/// Whether a command succeeded, and what it printed (stdout, then stderr), trimmed.
fn outcome(out: std::process::Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_string())
}

fn load(lab: &TestLab, client: &str, seconds: &str) -> Value {
    lab.json(&[
        "db",
        "load",
        "--clients",
        "4",
        "--seconds",
        seconds,
        "--client",
        client,
        "--json",
    ])
}

fn acked(v: &Value) -> usize {
    v["acknowledged"].as_array().map_or(0, Vec::len)
}

fn platform(name: &str) -> TestLab {
    let lab = TestLab::new(name);
    lab.up();
    lab.ok(&["db", "up", "--timeout", "60"]);
    lab
}

#[test]
fn sync_commits_wait_for_the_standby_then_fall_back_and_return() {
    if !e2e_enabled() {
        return;
    }
    let lab = platform("tdbsync");
    let s = status(&lab);
    assert_eq!(s["leader"], "dc1.1", "{s}");
    assert_eq!(s["replication"], "sync", "{s}");
    assert_eq!(s["sync_set"][0], "dc2.1", "{s}");
    // The primary names DC2.1 its synchronous standby, and a commit takes at least the
    // 5 ms round trip to DC2.1 (an async commit here takes well under 2 ms).
    let (ok, state) = psql(
        &lab,
        "dc1.1-client",
        DC11,
        "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'dc2_1'",
    );
    assert!(ok && (state == "quorum" || state == "sync"), "{state}");
    // Only the database sites' hosts get in, and only with the password: a host of
    // another site is not in pg_hba.conf, a client without the password file is refused.
    let (ok, text) = psql(&lab, "cloud-h1", DC11, "SELECT 1");
    assert!(!ok && text.contains("no pg_hba.conf entry"), "{text}");
    let (ok, text) = psql_with(
        &lab,
        "dc1.1-client",
        DC11,
        "SELECT 1",
        &["-u", "PGPASSFILE"],
    );
    assert!(!ok && text.contains("password"), "{text}");
    let hba = std::fs::read_to_string(
        lab.state_dir
            .join(&lab.name)
            .join("db/dc1.1/data/pg_hba.conf"),
    )
    .unwrap();
    let host_rules: Vec<&str> = hba.lines().filter(|l| l.starts_with("host")).collect();
    assert!(
        host_rules.iter().all(|l| l.ends_with("scram-sha-256")
            && !l.contains("/16")
            && (l.starts_with("hostssl") || l.contains(" 127.0.0.1/32 ") || l.contains("::1/128"))),
        "{hba}"
    );
    // A network (the sites' guests) is admitted only as the application role, only to
    // the ledger.
    let networks: Vec<&&str> = host_rules.iter().filter(|l| l.contains("/24")).collect();
    assert!(
        !networks.is_empty()
            && networks
                .iter()
                .all(|l| l.starts_with("hostssl ledger ap 10.77.")),
        "{hba}"
    );
    // Only over TLS: a client that does not ask for it is refused; the ones that do, and
    // the standbys' streams, are encrypted.
    let (ok, text) = psql_with(
        &lab,
        "dc1.1-client",
        DC11,
        "SELECT 1",
        &["PGSSLMODE=disable"],
    );
    assert!(!ok && text.contains("no encryption"), "{text}");
    let (ok, text) = psql(
        &lab,
        "dc1.1-client",
        DC11,
        "SELECT bool_and(s.ssl) || '/' || count(*) FROM pg_stat_ssl s \
         JOIN pg_stat_replication r USING (pid)",
    );
    assert!(ok && text == "true/2", "{text}");
    // etcd serves TLS only and wants a consensus certificate of the zone: a guest's host,
    // which holds no certificate, gets no answer over HTTP and a refused handshake; the
    // operator's access bundle and a host's certificate, which open the agents, are
    // refused too; a consensus certificate (DC1.1's host's, which its HA agent shows) gets
    // an answer.
    let dir = lab.state_dir.join(&lab.name);
    let path = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let ca = path("pki/ca.crt");
    let url = format!("https://{DC11}:2379/health");
    let (ok, text) = curl(&lab, "cloud-h1", &[&format!("http://{DC11}:2379/health")]);
    assert!(!ok && text.contains("Empty reply"), "{text}");
    let (ok, text) = curl(&lab, "cloud-h1", &["--cacert", &ca, &url]);
    assert!(!ok && text.contains("alert bad certificate"), "{text}");
    for (cert, key) in [
        ("access/operator.crt", "access/operator.key"),
        ("pki/hosts/cloud-h1.crt", "pki/hosts/cloud-h1.key"),
    ] {
        let (ok, text) = curl(
            &lab,
            "cloud-h1",
            &[
                "--cacert",
                &ca,
                "--cert",
                &path(cert),
                "--key",
                &path(key),
                &url,
            ],
        );
        // etcd refuses the certificate with an alert, or (seen once, under load) closes the
        // handshake before curl reads it: "getpeername() failed with errno 107".
        let refused = text.contains("bad certificate") || text.contains("errno 107");
        assert!(!ok && refused, "{cert}: {text}");
    }
    let (cert, key) = (
        path("pki/consensus/dc1.1-h1.crt"),
        path("pki/consensus/dc1.1-h1.key"),
    );
    let (ok, text) = curl(
        &lab,
        "cloud-h1",
        &["--cacert", &ca, "--cert", &cert, "--key", &key, &url],
    );
    assert!(ok && text.contains(r#""health":"true""#), "{text}");
    let r = load(&lab, "dc1.1-client", "2");
    let p50 = r["tatrxn_p50_ms"].as_f64().unwrap();
    assert!(
        acked(&r) > 0 && p50 >= 5.0,
        "sync commit p50 {p50} ms, expected >= 5"
    );
    // The commits are on DC2.1: its received position reaches the primary's.
    let (_, primary_lsn) = psql(&lab, "dc1.1-client", DC11, "SELECT pg_current_wal_lsn()");
    let (_, caught) = psql(
        &lab,
        "dc1.1-client",
        "10.77.3.11",
        &format!("SELECT pg_last_wal_receive_lsn() >= '{primary_lsn}'::pg_lsn"),
    );
    assert_eq!(caught, "t");

    // DC2.1 fails under load: commits continue (availability-first), the window is audited.
    let bg = {
        let mut c = lab.command();
        c.args(["db", "load", "--clients", "4", "--seconds", "6", "--json"]);
        c.spawn().expect("load runs")
    };
    sleep(Duration::from_secs(2));
    lab.ok(&["lab", "site", "isolate", "dc2.1"]);
    let out = bg.wait_with_output().expect("load finishes");
    assert!(out.status.success());
    let s = wait_status(&lab, "switch to async", Duration::from_secs(5), |v| {
        v["replication"] == "async"
    });
    let windows: Vec<&Value> = s["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "unprotected" && e["end_ms"].is_null())
        .collect();
    assert_eq!(windows.len(), 1, "one open unprotected window: {s}");
    let after = load(&lab, "dc1.1-client", "1");
    assert!(acked(&after) > 0, "commits continue while DC2.1 is away");

    // DC2.1 returns and catches up: back to sync, the window closed.
    lab.ok(&["lab", "site", "restore", "dc2.1"]);
    let s = wait_status(&lab, "return to sync", Duration::from_secs(30), |v| {
        v["replication"] == "sync"
    });
    assert!(
        s["audit"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "unprotected")
            .all(|e| e["end_ms"].is_u64()),
        "every unprotected window closed: {s}"
    );
    let audit = lab.json(&["db", "audit", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
    assert_eq!(audit["balances_conserved"], true, "{audit}");

    // Planned switchover: bad targets are refused and change nothing.
    for (to, says) in [
        ("dc9.9", "unknown database site"),
        ("dc1.1", "already the primary"),
    ] {
        let out = lab.run(&["db", "switchover", "--to", to]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{to}: {err}");
    }
    assert_eq!(status(&lab)["leader"], "dc1.1");
    // Under load, DC1.2 takes over, DC1.1 rejoins as its standby, and nothing is lost.
    let bg = {
        let mut c = lab.command();
        c.args(["db", "load", "--clients", "4", "--seconds", "6", "--json"]);
        c.spawn().expect("load runs")
    };
    sleep(Duration::from_secs(2));
    let sw = lab.json(&["db", "switchover", "--to", "dc1.2", "--json"]);
    assert!(sw["first_commit_ms"].as_f64().unwrap() > 0.0, "{sw}");
    let out = bg.wait_with_output().expect("load finishes");
    assert!(out.status.success());
    let s = status(&lab);
    assert_eq!(s["leader"], "dc1.2", "{s}");
    let role = |site: &str| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["site"] == site)
            .map(|m| {
                (
                    m["pg_up"].as_bool().unwrap(),
                    m["in_recovery"].as_bool().unwrap(),
                )
            })
    };
    assert_eq!(role("dc1.1"), Some((true, true)), "DC1.1 is a standby: {s}");
    assert!(
        s["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "switchover" && e["primary"] == "dc1.2"),
        "the switchover is in the audit log: {s}"
    );
    let audit = lab.json(&["db", "audit", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
    assert_eq!(audit["balances_conserved"], true, "{audit}");
}

#[test]
fn failover_passes_the_audit_and_the_partitioned_primary_is_fenced() {
    if !e2e_enabled() {
        return;
    }
    let lab = platform("tdbfail");
    load(&lab, "dc1.1-client", "2");
    // A partition, not a crash: DC1.1's PostgreSQL and agent keep running, cut off.
    let bg = {
        let mut c = lab.command();
        c.args([
            "db",
            "load",
            "--clients",
            "4",
            "--seconds",
            "12",
            "--client",
            "dc1.2-h2",
        ]);
        c.spawn().expect("load runs")
    };
    sleep(Duration::from_secs(2));
    lab.ok(&["lab", "site", "isolate", "dc1.1"]);
    assert!(bg.wait_with_output().unwrap().status.success());
    // The new primary holds the key and has written its failover entry (a moment later).
    wait_status(&lab, "failover", Duration::from_secs(20), |v| {
        v["leader"].is_string()
            && v["leader"] != "dc1.1"
            && v["audit"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["kind"] == "failover"))
    });
    // The old primary lost its lease and fenced itself: its own site cannot write to it.
    let (ok, text) = psql(
        &lab,
        "dc1.1-client",
        DC11,
        "INSERT INTO transfers VALUES ('fence-probe', 1, 2, 1)",
    );
    assert!(!ok, "the partitioned old primary accepted a write: {text}");
    let audit = lab.json(&["db", "audit", "--client", "dc1.2-h2", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
    assert_eq!(audit["balances_match_transfers"], true, "{audit}");

    // The partition heals: the old primary comes back as a standby of the new one.
    lab.ok(&["lab", "site", "restore", "dc1.1"]);
    lab.ok(&["db", "up", "--timeout", "60"]);
    let (_, recovery) = psql(&lab, "dc1.1-client", DC11, "SELECT pg_is_in_recovery()");
    assert_eq!(recovery, "t", "DC1.1 rejoined as a standby");
    let (ok, _) = psql(
        &lab,
        "dc1.1-client",
        DC11,
        "INSERT INTO transfers VALUES ('fence-probe-2', 1, 2, 1)",
    );
    assert!(!ok, "the rejoined old primary must not accept writes");
    let audit = lab.json(&["db", "audit", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
}

#[test]
fn agent_kill_etcd_quorum_loss_and_an_unreachable_standby_are_safe() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("tdbfault");
    lab.up();
    // A standby that cannot be reached at setup: a clear error naming it.
    lab.ok(&["lab", "site", "isolate", "dc2.1"]);
    let out = lab.run(&["db", "up", "--timeout", "15"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("dc2_1"), "{err}");
    lab.ok(&["lab", "site", "restore", "dc2.1"]);
    lab.ok(&["db", "up", "--timeout", "60"]);
    load(&lab, "dc1.1-client", "1");

    // Killing the primary's HA agent takes its PostgreSQL with it; a standby takes over.
    let pid_file = lab.state_dir.join(&lab.name).join("db/dc1.1/agent.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: killing a process of our own lab by pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_status(
        &lab,
        "failover after the agent died",
        Duration::from_secs(20),
        |v| v["leader"].is_string() && v["leader"] != "dc1.1",
    );
    let (ok, _) = psql(&lab, "dc1.1-client", DC11, "SELECT 1");
    assert!(!ok, "DC1.1's PostgreSQL must be down with its agent");
    lab.ok(&["db", "up", "--timeout", "60"]);
    let audit = lab.json(&["db", "audit", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");

    // etcd loses quorum: the primary cannot renew its lease and stops acknowledging. Every
    // member outside the leader's site dies (5 members: dc1.x one each, dc2.1 two, witness).
    let leader = status(&lab)["leader"].as_str().unwrap().to_string();
    let etcd_dir = lab.state_dir.join(&lab.name).join("etcd");
    let mut killed = 0;
    for entry in std::fs::read_dir(&etcd_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some(member) = name.strip_suffix(".pid") else {
            continue;
        };
        if member.starts_with(&format!("{}_", leader.replace('.', "_"))) {
            continue;
        }
        let pid: i32 = std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: killing a process of our own lab by pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        killed += 1;
    }
    assert!(
        killed >= 3,
        "a majority of the 5 members killed, got {killed}"
    );
    sleep(Duration::from_secs(4));
    let primary_ip = if leader == "dc1.2" {
        DC12
    } else if leader == "dc1.1" {
        DC11
    } else {
        "10.77.3.11"
    };
    let (ok, text) = psql(
        &lab,
        "dc1.1-client",
        primary_ip,
        "INSERT INTO transfers VALUES ('quorum-probe', 1, 2, 1)",
    );
    assert!(
        !ok,
        "a primary without etcd quorum acknowledged a commit: {text}"
    );
    // Quorum back (db up restarts the members): the platform recovers, nothing lost.
    lab.ok(&["db", "up", "--timeout", "60"]);
    let audit = lab.json(&["db", "audit", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
    assert_eq!(audit["balances_conserved"], true, "{audit}");
}

const DC21: &str = "10.77.3.11";

/// Is `site` a running, unfenced standby in `db status`?
fn standby(s: &Value, site: &str) -> bool {
    s["members"].as_array().is_some_and(|ms| {
        ms.iter().any(|m| {
            m["site"] == site
                && m["pg_up"] == true
                && m["in_recovery"] == true
                && m["fenced"] == false
        })
    })
}

fn spawn_load(lab: &TestLab, client: &str, seconds: &str) -> std::process::Child {
    let mut c = lab.command();
    c.args([
        "db",
        "load",
        "--clients",
        "4",
        "--seconds",
        seconds,
        "--client",
        client,
        "--json",
    ]);
    c.stdout(std::process::Stdio::piped());
    c.spawn().expect("load runs")
}

fn finished_load(child: std::process::Child) -> Value {
    let out = child.wait_with_output().expect("load finishes");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("load JSON")
}

#[test]
fn a_lost_region_fails_over_to_dc2_1_rejoins_and_comes_home() {
    if !e2e_enabled() {
        return;
    }
    let lab = platform("tdbreg");
    // A client outside region 1 commits through the whole disaster.
    let bg = spawn_load(&lab, "dc2.1-h2", "14");
    sleep(Duration::from_secs(3));
    let cut = Instant::now();
    lab.ok(&["lab", "site", "isolate", "dc1.1"]);
    lab.ok(&["lab", "site", "isolate", "dc1.2"]);
    // The new primary holds the key and has written its failover entry (a moment later).
    wait_status(&lab, "failover to DC2.1", Duration::from_secs(15), |v| {
        v["leader"] == "dc2.1"
            && v["audit"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|e| e["kind"] == "failover" && e["primary"] == "dc2.1")
            })
    });
    let rto = cut.elapsed();
    let r = finished_load(bg);
    assert!(acked(&r) > 0, "{r}");
    // Every acknowledged transfer is on DC2.1, exactly once.
    let audit = lab.json(&["db", "audit", "--client", "dc2.1-h2", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
    assert_eq!(audit["balances_match_transfers"], true, "{audit}");
    // Inside the lost region nothing accepts writes: the old primary fenced itself.
    let (ok, text) = psql(
        &lab,
        "dc1.1-client",
        DC11,
        "INSERT INTO transfers VALUES ('region-fence-probe', 1, 2, 1)",
    );
    assert!(!ok, "the cut-off old primary accepted a write: {text}");
    // A standard libpq client finds the new primary with the multi-host string.
    let conninfo = lab.ok(&["db", "conninfo", "--client", "dc2.1-h2"]);
    let out = lab.run(&[
        "lab",
        "exec",
        "dc2.1-h2",
        "--",
        "timeout",
        "20",
        "runuser",
        "-u",
        "postgres",
        "--",
        "/usr/lib/postgresql/15/bin/psql",
        conninfo.trim(),
        "-tAc",
        "SELECT inet_server_addr()",
    ]);
    let addr = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && addr.trim() == DC21,
        "libpq with {conninfo}: {addr} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("region failover after {rto:?}");

    // Region 1 returns while DC2.1 is primary: no split brain; the old primary rejoins.
    lab.ok(&["lab", "site", "restore", "dc1.1"]);
    lab.ok(&["lab", "site", "restore", "dc1.2"]);
    wait_status(&lab, "region 1 rejoins", Duration::from_secs(90), |v| {
        v["leader"] == "dc2.1" && standby(v, "dc1.1") && standby(v, "dc1.2")
    });
    let (ok, _) = psql(
        &lab,
        "dc1.1-client",
        DC11,
        "INSERT INTO transfers VALUES ('region-fence-probe-2', 1, 2, 1)",
    );
    assert!(!ok, "the rejoined old primary must not accept writes");
    // A planned switchover brings the primary home, under load, losing nothing.
    wait_status(&lab, "back to sync", Duration::from_secs(30), |v| {
        v["replication"] == "sync"
    });
    let bg = spawn_load(&lab, "dc1.1-client", "5");
    sleep(Duration::from_secs(1));
    lab.ok(&["db", "switchover", "--to", "dc1.1"]);
    finished_load(bg);
    assert_eq!(status(&lab)["leader"], "dc1.1");
    let audit = lab.json(&["db", "audit", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
}

#[test]
fn the_witness_lost_with_dc2_1_leaves_region_1_the_primary_and_a_cut_during_a_switchover_is_safe() {
    if !e2e_enabled() {
        return;
    }
    let lab = platform("tdbwit");
    load(&lab, "dc1.1-client", "1");
    // DC2.1 and the witness lost together: region 1 holds 2 of 5 consensus members. No
    // one may be promoted; the primary cannot commit (it cannot know DC2.1 was not
    // promoted), and `db status` says why.
    lab.ok(&["lab", "site", "isolate", "witness"]);
    lab.ok(&["lab", "site", "isolate", "dc2.1"]);
    sleep(Duration::from_secs(4));
    let out = lab.run(&["db", "status", "--json"]);
    assert!(!out.status.success());
    let d: Value = serde_json::from_slice(&out.stdout).expect("degraded status JSON");
    assert_eq!(d["consensus_quorum"], false, "{d}");
    let unreachable = d["unreachable_consensus_members"].to_string();
    assert!(
        unreachable.contains("witness_h1") && unreachable.contains("dc2_1_h1"),
        "{d}"
    );
    let role = |site: &str| {
        d["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["site"] == site)
            .map(|m| m["role"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(role("dc1.2"), "standby", "{d}");
    assert_ne!(role("dc1.1"), "primary", "a primary without consensus: {d}");
    // The witness returns: region 1 has a majority again and keeps the primary.
    lab.ok(&["lab", "site", "restore", "witness"]);
    wait_status(&lab, "DC1.1 leads again", Duration::from_secs(20), |v| {
        v["leader"] == "dc1.1" && v["replication"] == "async"
    });
    let r = load(&lab, "dc1.1-client", "1");
    assert!(acked(&r) > 0, "region 1 commits again: {r}");
    lab.ok(&["lab", "site", "restore", "dc2.1"]);
    wait_status(&lab, "back to sync", Duration::from_secs(60), |v| {
        v["replication"] == "sync"
    });

    // Region 1 cut while a switchover DC1.1 -> DC1.2 is under way: whoever ends up
    // primary, nothing acknowledged is lost and DC2.1 serves.
    let bg = spawn_load(&lab, "dc2.1-h2", "12");
    sleep(Duration::from_secs(2));
    let mut sw = lab.command();
    sw.args(["db", "switchover", "--to", "dc1.2", "--timeout", "20"]);
    let sw = sw.spawn().expect("switchover runs");
    sleep(Duration::from_millis(150));
    lab.ok(&["lab", "site", "isolate", "dc1.1"]);
    lab.ok(&["lab", "site", "isolate", "dc1.2"]);
    wait_status(&lab, "DC2.1 takes over", Duration::from_secs(20), |v| {
        v["leader"] == "dc2.1"
    });
    let _ = sw.wait_with_output();
    finished_load(bg);
    let audit = lab.json(&["db", "audit", "--client", "dc2.1-h2", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
    for ip in [DC11, DC12] {
        let (ok, text) = psql(
            &lab,
            "dc1.1-client",
            ip,
            "INSERT INTO transfers VALUES ('switchover-cut-probe', 1, 2, 1)",
        );
        assert!(!ok, "{ip} accepted a write while cut off: {text}");
    }
    lab.ok(&["lab", "site", "restore", "dc1.1"]);
    lab.ok(&["lab", "site", "restore", "dc1.2"]);
    lab.ok(&["db", "up", "--timeout", "90"]);
    let audit = lab.json(&["db", "audit", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
}

#[test]
fn manual_failover_is_refused_without_proof_and_with_the_flag_rebuilds_consensus_on_dc2_1() {
    if !e2e_enabled() {
        return;
    }
    let lab = platform("tdbman");
    load(&lab, "dc1.1-client", "1");
    // With consensus up, the HA agents decide: a manual failover is refused.
    let out = lab.run(&["db", "failover", "--to", "dc1.2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("consensus answers"),
        "{err}"
    );
    // Region 1 and the witness lost: DC2.1 holds 2 of 5 etcd members, no quorum anywhere.
    for site in ["dc1.1", "dc1.2", "witness"] {
        lab.ok(&["lab", "site", "isolate", site]);
    }
    sleep(Duration::from_secs(4));
    let out = lab.run(&["db", "failover", "--to", "dc2.1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("dc1.1, dc1.2 cannot be reached")
            && err.contains("--accept-data-loss"),
        "{err}"
    );
    assert_eq!(
        lab.run(&["db", "status"]).status.code(),
        Some(1),
        "still no consensus after the refusal"
    );
    // With the flag, by an operator at DC2.1 with only the access bundle (every step
    // through the agents): consensus rebuilt on DC2.1's members, DC2.1 primary, the
    // exposure said.
    let bundle = lab.state_dir.join(&lab.name).join("access");
    let out = remote(
        &lab.ns("dc2.1-h2"),
        &bundle,
        &[
            "db",
            "failover",
            "--to",
            "dc2.1",
            "--accept-data-loss",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "db failover --access: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["proven"], false, "{r}");
    assert!(r["unknown"].to_string().contains("dc1.1"), "{r}");
    assert_eq!(r["consensus_rebuilt_on"], "dc2_1_h1", "{r}");
    let s = status(&lab);
    assert_eq!(s["leader"], "dc2.1", "{s}");
    assert!(
        s["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "manual-failover" && e["primary"] == "dc2.1"),
        "the manual failover is in the audit log: {s}"
    );
    let after = load(&lab, "dc2.1-h2", "1");
    assert!(acked(&after) > 0, "DC2.1 commits: {after}");
    // Everything returns: `db up` re-adds the etcd members, region 1 rejoins as standbys,
    // and nothing acknowledged is lost (the cut happened with no load running).
    for site in ["dc1.1", "dc1.2", "witness"] {
        lab.ok(&["lab", "site", "restore", site]);
    }
    lab.ok(&["db", "up", "--timeout", "90"]);
    let s = status(&lab);
    assert!(standby(&s, "dc1.1") && standby(&s, "dc1.2"), "{s}");
    let audit = lab.json(&["db", "audit", "--json"]);
    assert_eq!(audit["rpo_zero"], true, "{audit}");
}
