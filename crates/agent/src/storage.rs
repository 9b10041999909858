//! The host's part of the zone's storage clusters (`dczone_storage::host`), behind the
//! agent's `/v1/storage/...` routes (operator certificate only; the table is in
//! `dczone_storage::operator`). Calls that install, start or stop daemons take one lock,
//! so that two operators' calls at once create each daemon once.

use axum::http::StatusCode;
use serde_json::{json, Value};

use dczone_storage::operator::HostView;
use dczone_storage::StorageError;

use crate::{Agent, AgentError, AgentRequest};

pub(crate) fn status_code(e: &StorageError) -> StatusCode {
    match e {
        StorageError::Conflict(_) => StatusCode::CONFLICT,
        StorageError::NotInstalled { .. } | StorageError::NotAdmin { .. } => StatusCode::NOT_FOUND,
        StorageError::Command { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn check_name(cluster: &str) -> Result<(), AgentError> {
    let ok = !cluster.is_empty()
        && cluster
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        && !cluster.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Conflict(format!(
            "'{cluster}' is not a cluster name (letters, digits, '-', '.', '_')"
        ))
        .into())
    }
}

impl Agent {
    pub(crate) fn storage_request(&self, req: AgentRequest) -> Result<Value, AgentError> {
        let s = &self.storage;
        let busy = || self.storage_busy.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match req {
            AgentRequest::StorageInstall { cluster, body } => {
                check_name(&cluster)?;
                if body.plan.name != cluster {
                    return Err(StorageError::Conflict(format!(
                        "the plan is of cluster {}, not {cluster}",
                        body.plan.name
                    ))
                    .into());
                }
                let _g = busy();
                json!(s.install(&body.plan, &body.keys, body.monmap.as_deref())?)
            }
            AgentRequest::StorageView { cluster } => {
                check_name(&cluster)?;
                let plan = s.plan(&cluster)?;
                let daemons = match &plan {
                    Some(_) => s.daemons(&cluster)?,
                    None => Vec::new(),
                };
                json!(HostView {
                    host: self.host.clone(),
                    fsid: plan.map(|p| p.fsid),
                    daemons,
                })
            }
            AgentRequest::StorageStart { cluster, body } => {
                check_name(&cluster)?;
                let _g = busy();
                json!(s.start(&cluster, &body.kinds)?)
            }
            AgentRequest::StorageStop { cluster, body } => {
                check_name(&cluster)?;
                let _g = busy();
                json!(s.stop(&cluster, body.daemon.as_deref())?)
            }
            AgentRequest::StorageSetup { cluster } => {
                check_name(&cluster)?;
                let _g = busy();
                json!(s.setup(&cluster)?)
            }
            AgentRequest::StorageStatus { cluster } => {
                check_name(&cluster)?;
                json!(s.status(&cluster)?)
            }
            AgentRequest::StoragePurge { cluster } => {
                check_name(&cluster)?;
                let _g = busy();
                json!(s.purge(&cluster)?)
            }
            other => unreachable!("not a storage request: {other:?}"),
        })
    }
}
