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

/// The control socket of the HA agent whose member directory is `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("ha.sock")
}

/// What the host's agent may ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Everything under the platform's prefix ([`crate::keys::Snapshot`]).
    Snapshot,
    /// File a planned switchover (`db switchover`); the primary's agent carries it out.
    RequestSwitchover { request: Switchover },
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
    #[error("the HA agent refused: {0}")]
    Refused(String),
}

/// Serves the control socket until the agent exits. A stale socket of a previous agent
/// is replaced. `policies` are the zone's tiers, the only values `SetPolicy` takes.
pub async fn serve(path: PathBuf, store: Store, policies: Vec<String>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let (store, policies) = (store.clone(), policies.clone());
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
                        Err(e) => json!({ "error": e }),
                    },
                    Err(e) => json!({ "error": format!("unreadable request: {e}") }),
                },
                _ => return,
            };
            let _ = conn.write_all(answer.to_string().as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

async fn answer(store: &Store, policies: &[String], req: ControlRequest) -> Result<Value, String> {
    let e = |e: crate::keys::StoreError| e.to_string();
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
            serde_json::to_value(snap).map_err(|err| err.to_string())?
        }
        ControlRequest::RequestSwitchover { request } => {
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
                return Err(format!(
                    "unknown policy '{tier}'; the zone defines {}",
                    policies.join(", ")
                ));
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
        Some(why) => Err(ControlError::Refused(why.to_string())),
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
            serde_json::from_str(r#"{"op":"request_switchover","request":{"from":"dc1.1","to":"dc1.2","requested_ms":1,"final_lsn":null,"handed_over_ms":null,"refused":null}}"#)
                .unwrap();
        assert!(
            matches!(back, ControlRequest::RequestSwitchover { request } if request.to == "dc1.2")
        );
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
