//! The one helper every end-to-end test goes through: a lab of its own, driven through the
//! real `dczone` binary, torn down on drop.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The guest address of a VM record (`vm show --json`, `vm create --json`).
pub fn guest_ip(vm: &serde_json::Value) -> Ipv4Addr {
    vm["spec"]["ip_cidr"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// End-to-end tests need root and run only with `DCZONE_E2E=1` (the test command sets it).
/// Under CI (`CI` set) a missing `DCZONE_E2E` fails the test instead: a skipped test must
/// not pass there as if it had run.
pub fn e2e_enabled() -> bool {
    e2e_decision(
        std::env::var_os("DCZONE_E2E").is_some(),
        std::env::var_os("CI").is_some(),
    )
}

fn e2e_decision(e2e: bool, ci: bool) -> bool {
    match (e2e, ci) {
        (true, _) => true,
        (false, true) => panic!(
            "CI is set but DCZONE_E2E is not: the end-to-end tests would pass without \
             running; run them with DCZONE_E2E=1 (as `scripts/test` does)"
        ),
        (false, false) => {
            eprintln!("skipped: set DCZONE_E2E=1 (needs root) to run end-to-end tests");
            false
        }
    }
}

#[test]
#[should_panic(expected = "DCZONE_E2E")]
fn under_ci_a_missing_e2e_switch_fails_instead_of_skipping() {
    e2e_decision(false, true);
}

#[test]
fn outside_ci_a_missing_e2e_switch_skips_and_the_switch_runs() {
    assert!(!e2e_decision(false, false));
    assert!(e2e_decision(true, true));
}

/// Runs `dczone ARGS...` inside namespace `ns` with only the access bundle `access` and an
/// empty state directory: nothing of the lab's files is used.
pub fn remote(ns: &str, access: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_dczone"),
            "--access",
        ])
        .arg(access)
        .args(["--state-dir", "/nonexistent/dczone-remote"])
        .args(args)
        .output()
        .unwrap()
}

/// One lab per test, with its own name and state directory.
pub struct TestLab {
    pub name: String,
    pub state_dir: PathBuf,
}

impl TestLab {
    pub fn new(name: &str) -> TestLab {
        let lab = TestLab {
            name: name.to_string(),
            state_dir: std::env::temp_dir().join(format!("dczone-test-{name}")),
        };
        lab.ok(&["lab", "down"]);
        lab
    }

    /// `dczone --lab NAME --state-dir DIR ARGS...`
    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dczone"));
        c.args(["--lab", &self.name, "--state-dir"])
            .arg(&self.state_dir);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("dczone runs")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "dczone {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }

    pub fn up(&self) {
        self.ok(&["lab", "up"]);
    }

    /// The QEMU processes in `host`'s namespace.
    pub fn qemus(&self, host: &str) -> Vec<i32> {
        dczone_lab::sys::pids_in_namespace(&self.ns(host))
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.starts_with("qemu-system"))
            })
            .collect()
    }

    /// Kills `host`'s agent (`dczoned`) and waits until it is gone. The next command that
    /// needs it starts it again, with that command's environment (e.g. `FAILPOINTS`).
    pub fn kill_agent(&self, host: &str) {
        use dczone_lab::sys;
        let is_agent = |p: &i32| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "dczoned")
        };
        for pid in sys::pids_in_namespace(&self.ns(host))
            .iter()
            .filter(|p| is_agent(p))
        {
            sys::kill(*pid, libc::SIGKILL);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sys::pids_in_namespace(&self.ns(host)).iter().any(is_agent) {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent of {host} does not die"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    /// `lab status --json`, which exits non-zero (but still reports) when unhealthy.
    pub fn status(&self) -> serde_json::Value {
        let out = self.run(&["lab", "status", "--json"]);
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    /// Is `to` reachable from `from` by ICMP within a second?
    /// A failed test keeps its lab's logs (agents, PostgreSQL, etcd, QEMU, the emulator)
    /// under the target directory, since `lab down` removes the state directory.
    fn keep_logs(&self) {
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("failed-labs");
        let mut stack = vec![self.state_dir.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                } else if path.extension().is_some_and(|x| x == "log") {
                    let rel = path.strip_prefix(&self.state_dir).unwrap_or(&path);
                    let to = keep.join(rel);
                    let _ = std::fs::create_dir_all(to.parent().unwrap_or(&keep));
                    let _ = std::fs::copy(&path, &to);
                }
            }
        }
        eprintln!("the failed lab's logs are kept in {}", keep.display());
    }

    /// The last lines of each host agent's log, for an assertion's message.
    pub fn agent_log_tail(&self, hosts: &[&str]) -> String {
        let dir = self.state_dir.join(&self.name).join("agents");
        hosts
            .iter()
            .map(|h| {
                let text = std::fs::read_to_string(dir.join(format!("{h}.log")))
                    .unwrap_or_else(|e| format!("(unreadable: {e})"));
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
                format!("\n{h}'s agent:\n  {tail}")
            })
            .collect()
    }

    pub fn reachable(&self, from: &str, to: Ipv4Addr) -> bool {
        dczone_lab::probe::measure_rtt(&self.ns(from), to, 1, Duration::ZERO).is_ok()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep_logs();
        }
        let down = self.run(&["lab", "down"]);
        if down.status.success() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        } else {
            // Its state stays, so that `dczone --state-dir DIR lab down` can finish.
            eprintln!(
                "`lab down` of test lab {} failed; its state stays in {}: {}",
                self.name,
                self.state_dir.display(),
                String::from_utf8_lossy(&down.stderr)
            );
        }
    }
}
