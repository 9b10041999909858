//! The HA agent's local control socket: how its host's agent (`dczoned`) reads the
//! platform's state and files a planned switchover on the operator's behalf, without
//! holding etcd credentials of its own. Only the HA agents hold those (ARCHITECTURE.md).
//!
//! The socket is `<member dir>/ha.sock`, mode 0600 (root only). One JSON request per
//! connection, one JSON answer: `{"ok": VALUE}` or `{"error": "..."}`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::decide::Switchover;
use crate::keys::Store;

/// The HA agent's current etcd client (it replaces its client when calls keep failing).
pub type CurrentStore = std::sync::Arc<dyn Fn() -> Store + Send + Sync>;

/// The control socket of the HA agent whose member directory is `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("ha.sock")
}

/// What the host's agent may ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Everything under the platform's prefix ([`crate::keys::Snapshot`]).
    Snapshot,
    /// File a planned switchover from the primary `from` to the standby `to` (`db
    /// switchover`); the primary's agent carries it out. The HA agent stamps it with its
    /// own clock, and the fields only the primary sets start empty.
    RequestSwitchover { from: String, to: String },
    /// Withdraw a switchover request (refused or done).
    ClearSwitchover,
    /// Switch the replication policy at run time (`db policy`): one of the zone's tiers.
    SetPolicy { tier: String },
}

/// Why asking the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no HA agent answers on {}: {reason}", path.display())]
    Unreachable { path: PathBuf, reason: String },
    /// The request is wrong (e.g. an unknown policy): asking elsewhere gives the same.
    #[error("{0}")]
    Invalid(String),
    /// The HA agent could not carry it out now (e.g. etcd has no quorum from here).
    #[error("the HA agent could not: {0}")]
    Unavailable(String),
}

/// Why the HA agent did not carry out a request.
enum Failure {
    Invalid(String),
    Unavailable(String),
}

/// Binds the control socket at `path` (mode 0600; a stale socket of a previous agent is
/// replaced). Binding is separate from [`serve`] so that a failure stops the agent.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the control socket until the agent exits, each request with the agent's
/// current etcd client. `policies` are the zone's tiers, the only values `SetPolicy` takes.
pub async fn serve(listener: tokio::net::UnixListener, store: CurrentStore, policies: Vec<String>) {
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(_) => {
                // Out of descriptors, say: the socket stays; try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (store, policies) = (store(), policies.clone());
        tokio::spawn(async move {
            let mut text = Vec::new();
            // A request is small; a client that sends more is not ours.
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                (&mut conn).take(64 * 1024).read_to_end(&mut text),
            )
            .await;
            let answer = match read {
                Ok(Ok(_)) => match serde_json::from_slice::<ControlRequest>(&text) {
                    Ok(req) => match answer(&store, &policies, req).await {
                        Ok(v) => json!({ "ok": v }),
                        Err(Failure::Invalid(e)) => json!({ "error": e, "invalid": true }),
                        Err(Failure::Unavailable(e)) => json!({ "error": e }),
                    },
                    Err(e) => {
                        json!({ "error": format!("unreadable request: {e}"), "invalid": true })
                    }
                },
                _ => return,
            };
            let _ = conn.write_all(answer.to_string().as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

async fn answer(store: &Store, policies: &[String], req: ControlRequest) -> Result<Value, Failure> {
    let e = |e: crate::keys::StoreError| Failure::Unavailable(e.to_string());
    Ok(match req {
        ControlRequest::Snapshot => {
            // etcd answers "leader changed" for a moment while its raft leadership moves.
            let mut attempt = 0;
            let snap = loop {
                match store.snapshot().await {
                    Err(err) if attempt < 4 && err.is_transient() => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    r => break r.map_err(e)?,
                }
            };
            serde_json::to_value(snap).map_err(|err| Failure::Unavailable(err.to_string()))?
        }
        ControlRequest::RequestSwitchover { from, to } => {
            let request = Switchover {
                from,
                to,
                requested_ms: crate::agent::unix_ms(),
                final_lsn: None,
                handed_over_ms: None,
                refused: None,
            };
            store
                .put_json(&store.keys.switchover(), &request, None)
                .await
                .map_err(e)?;
            Value::Null
        }
        ControlRequest::ClearSwitchover => {
            store.delete(&store.keys.switchover()).await.map_err(e)?;
            Value::Null
        }
        ControlRequest::SetPolicy { tier } => {
            if !policies.contains(&tier) {
                return Err(Failure::Invalid(format!(
                    "unknown policy '{tier}'; the zone defines {}",
                    policies.join(", ")
                )));
            }
            store
                .put_json(&store.keys.tier(), &tier, None)
                .await
                .map_err(e)?;
            Value::Null
        }
    })
}

/// Asks the HA agent at `path` (blocking; for the host's agent).
pub fn ask(path: &Path, req: &ControlRequest, timeout: Duration) -> Result<Value, ControlError> {
    let unreachable = |reason: String| ControlError::Unreachable {
        path: path.to_path_buf(),
        reason,
    };
    let mut conn =
        std::os::unix::net::UnixStream::connect(path).map_err(|e| unreachable(e.to_string()))?;
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .map_err(|e| unreachable(e.to_string()))?;
    let body = serde_json::to_vec(req).expect("requests serialize");
    conn.write_all(&body)
        .and_then(|()| conn.shutdown(std::net::Shutdown::Write))
        .map_err(|e| unreachable(e.to_string()))?;
    let mut text = Vec::new();
    conn.read_to_end(&mut text)
        .map_err(|e| unreachable(e.to_string()))?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| unreachable(format!("unreadable answer: {e}")))?;
    match v.get("error").and_then(Value::as_str) {
        Some(why) if v["invalid"] == true => Err(ControlError::Invalid(why.to_string())),
        Some(why) => Err(ControlError::Unavailable(why.to_string())),
        None => Ok(v["ok"].clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let text = serde_json::to_string(&ControlRequest::Snapshot).unwrap();
        assert_eq!(text, r#"{"op":"snapshot"}"#);
        let text = serde_json::to_string(&ControlRequest::ClearSwitchover).unwrap();
        assert_eq!(text, r#"{"op":"clear_switchover"}"#);
        let back: ControlRequest =
            serde_json::from_str(r#"{"op":"request_switchover","from":"dc1.1","to":"dc1.2"}"#)
                .unwrap();
        assert!(matches!(back, ControlRequest::RequestSwitchover { to, .. } if to == "dc1.2"));
        // What only the primary may set cannot be sent.
        let forged = serde_json::from_str::<ControlRequest>(
            r#"{"op":"request_switchover","from":"dc1.1","to":"dc1.2","final_lsn":0}"#,
        );
        assert!(forged.is_err(), "{forged:?}");
    }

    #[test]
    fn a_missing_socket_is_named() {
        let err = ask(
            Path::new("/nonexistent/ha.sock"),
            &ControlRequest::Snapshot,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ha.sock"), "{err}");
    }
}
