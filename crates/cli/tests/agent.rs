//! End-to-end test of the host agent `dczoned`: it runs in a host's namespace, refuses
//! requests without the bearer token, and manages that host's VMs over HTTP.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{e2e_enabled, TestLab};
use dczone_lab::sys;

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 11);

/// One HTTP/1.1 request from the client host; returns (status, body).
fn http(lab: &TestLab, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let answer = sys::in_namespace(&lab.ns("dc1.1-client"), move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((HOST_IP, 7070)), Duration::from_secs(2))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap_or_default();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_requires_the_token_and_manages_its_hosts_vms() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("e2eagent");
    lab.up();
    let token_file = lab.state_dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let _agent = Agent(
        lab.command()
            .args([
                "lab",
                "exec",
                "dc1.1-h1",
                "--",
                env!("CARGO_BIN_EXE_dczoned"),
            ])
            .args(["--lab", &lab.name, "--state-dir"])
            .arg(&lab.state_dir)
            .args(["--host", "dc1.1-h1", "--token-file"])
            .arg(&token_file)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&lab, "GET", "/v1/health", None, "").0 != 200 {
        assert!(Instant::now() < deadline, "dczoned did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }

    assert_eq!(http(&lab, "GET", "/v1/vms", None, "").0, 401);
    assert_eq!(
        http(&lab, "GET", "/v1/vms", Some("wrong-token!"), "").0,
        401
    );
    let t = Some("s3cret-token");
    let (status, body) = http(&lab, "GET", "/v1/vms", t, "");
    assert_eq!((status, body.as_str()), (200, "[]"));

    let (status, body) = http(
        &lab,
        "POST",
        "/v1/vms",
        t,
        r#"{"name":"api1","memory_mib":256}"#,
    );
    assert_eq!(status, 200, "{body}");
    let vm: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(vm["host"], "dc1.1-h1");
    assert!(!vm["running"].is_null());
    let (status, _) = http(&lab, "POST", "/v1/vms", t, r#"{"name":"api1"}"#);
    assert_eq!(status, 409, "a duplicate name must conflict");
    let (status, body) = http(&lab, "GET", "/v1/vms/api1/serial", t, "");
    assert_eq!(status, 200);
    assert!(body.contains("ledger listening"), "{body}");
    let (status, body) = http(&lab, "GET", "/v1/vms/nope", t, "");
    assert_eq!(status, 404, "{body}");
    assert_eq!(http(&lab, "POST", "/v1/vms/api1/stop", t, "").0, 200);
    assert_eq!(http(&lab, "POST", "/v1/vms/api1/stop", t, "").0, 409);
    assert_eq!(http(&lab, "DELETE", "/v1/vms/api1", t, "").0, 200);
    assert_eq!(http(&lab, "GET", "/v1/vms", t, "").1, "[]");
}
