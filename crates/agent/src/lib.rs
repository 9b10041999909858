//! `dczoned`, the host agent: one per host, inside the host's namespace, serving an HTTP
//! API over the VMs of that host. Every request but `/v1/health` needs
//! `Authorization: Bearer <token>`; without it, or with a wrong one: 401.
//!
//! API, version 1 (JSON in and out):
//!
//! | method and path | request |
//! |---|---|
//! | GET /v1/health | (no token) liveness |
//! | GET /v1/vms | [`AgentRequest::ListVms`] |
//! | POST /v1/vms | [`AgentRequest::CreateVm`], body [`CreateBody`] |
//! | GET /v1/vms/{name} | [`AgentRequest::GetVm`] |
//! | POST /v1/vms/{name}/start | [`AgentRequest::StartVm`] |
//! | POST /v1/vms/{name}/stop | [`AgentRequest::StopVm`] |
//! | DELETE /v1/vms/{name} | [`AgentRequest::DestroyVm`] |
//! | GET /v1/vms/{name}/serial | [`AgentRequest::SerialLog`] |
//!
//! The HTTP layer only translates into [`AgentRequest`]; [`Agent::handle`] does the work on
//! a blocking thread (QEMU and namespaces are driven synchronously by `dczone-virt`).
//! Not yet here: migration driven between two agents (the CLI drives it directly).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::Deserialize;
use serde_json::{json, Value};

use dczone_virt::{CreateVm, Platform, VirtError};

/// Every request the agent accepts. Each is legal whenever the agent runs; the VM-state
/// rules are the platform's (e.g. `StartVm` needs a stopped VM).
#[derive(Debug, Clone)]
pub enum AgentRequest {
    /// The VMs on this host.
    ListVms,
    /// One VM of this host.
    GetVm { name: String },
    /// Create and boot a VM on this host (its name must be new in the lab).
    CreateVm(CreateBody),
    /// Boot a stopped VM of this host.
    StartVm { name: String },
    /// Power off a running VM of this host.
    StopVm { name: String },
    /// Stop (if running) and forget a VM of this host.
    DestroyVm { name: String },
    /// The serial console log of a running VM of this host.
    SerialLog { name: String },
}

/// Body of `POST /v1/vms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub name: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default)]
    pub dirty_mbps: u32,
    #[serde(default = "default_dirty_mib")]
    pub dirty_mib: u32,
    pub group: Option<String>,
}

fn default_memory() -> u32 {
    256
}

fn default_dirty_mib() -> u32 {
    32
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("VM '{vm}' is not on this host ({host})")]
    NotHere { vm: String, host: String },
    #[error(transparent)]
    Virt(#[from] VirtError),
}

impl AgentError {
    fn status(&self) -> StatusCode {
        match self {
            AgentError::Unauthorized => StatusCode::UNAUTHORIZED,
            AgentError::NotHere { .. } | AgentError::Virt(VirtError::UnknownVm { .. }) => {
                StatusCode::NOT_FOUND
            }
            AgentError::Virt(VirtError::Exists(_)) => StatusCode::CONFLICT,
            AgentError::Virt(VirtError::BadSpec(_) | VirtError::NoMemory { .. }) => {
                StatusCode::BAD_REQUEST
            }
            AgentError::Virt(
                VirtError::AlreadyRunning(_) | VirtError::NotRunning(_) | VirtError::Busy(_),
            ) => StatusCode::CONFLICT,
            AgentError::Virt(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(&self);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        (self.status(), Json(json!({ "error": message }))).into_response()
    }
}

/// The agent of one host.
#[derive(Debug)]
pub struct Agent {
    platform: Platform,
    host: String,
    token: String,
}

impl Agent {
    pub fn new(platform: Platform, host: String, token: String) -> Agent {
        Agent {
            platform,
            host,
            token,
        }
    }

    fn here(&self, name: &str) -> Result<dczone_virt::VmRecord, AgentError> {
        let vm = self.platform.get(name)?;
        if vm.host != self.host {
            return Err(AgentError::NotHere {
                vm: name.into(),
                host: self.host.clone(),
            });
        }
        Ok(vm)
    }

    /// Carries out one request.
    pub fn handle(&self, req: AgentRequest) -> Result<Value, AgentError> {
        let to_json = |v: &dczone_virt::VmRecord| serde_json::to_value(v).unwrap_or(Value::Null);
        Ok(match req {
            AgentRequest::ListVms => Value::Array(
                self.platform
                    .list()?
                    .iter()
                    .filter(|v| v.host == self.host)
                    .map(to_json)
                    .collect(),
            ),
            AgentRequest::GetVm { name } => to_json(&self.here(&name)?),
            AgentRequest::CreateVm(b) => to_json(&self.platform.create(&CreateVm {
                name: b.name,
                host: self.host.clone(),
                memory_mib: b.memory_mib,
                dirty_mbps: b.dirty_mbps,
                dirty_mib: b.dirty_mib,
                group: b.group,
            })?),
            AgentRequest::StartVm { name } => {
                self.here(&name)?;
                to_json(&self.platform.start(&name)?)
            }
            AgentRequest::StopVm { name } => {
                self.here(&name)?;
                to_json(&self.platform.stop(&name)?)
            }
            AgentRequest::DestroyVm { name } => {
                self.here(&name)?;
                self.platform.destroy(&name)?;
                json!({ "destroyed": name })
            }
            AgentRequest::SerialLog { name } => {
                let vm = self.here(&name)?;
                let log = vm
                    .running
                    .map(|r| std::fs::read_to_string(r.serial).unwrap_or_default())
                    .ok_or(VirtError::NotRunning(name))?;
                json!({ "serial": log })
            }
        })
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compare every byte so the time taken does not reveal the matching prefix.
        given.len() == self.token.len()
            && given
                .bytes()
                .zip(self.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

type Shared = Arc<Agent>;

async fn dispatch(
    agent: Shared,
    headers: HeaderMap,
    req: AgentRequest,
) -> Result<Json<Value>, AgentError> {
    if !agent.authorized(&headers) {
        return Err(AgentError::Unauthorized);
    }
    let result = tokio::task::spawn_blocking(move || agent.handle(req)).await;
    result
        .unwrap_or_else(|e| {
            Err(AgentError::Virt(VirtError::Io {
                what: "agent worker".into(),
                source: std::io::Error::other(e.to_string()),
            }))
        })
        .map(Json)
}

/// The HTTP routes.
pub fn router(agent: Shared) -> Router {
    Router::new()
        .route("/v1/health", get(|| async { Json(json!({ "ok": true })) }))
        .route(
            "/v1/vms",
            get(|State(a): State<Shared>, h: HeaderMap| dispatch(a, h, AgentRequest::ListVms))
                .post(
                    |State(a): State<Shared>, h: HeaderMap, Json(body): Json<CreateBody>| {
                        dispatch(a, h, AgentRequest::CreateVm(body))
                    },
                ),
        )
        .route(
            "/v1/vms/{name}",
            get(
                |State(a): State<Shared>, h: HeaderMap, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::GetVm { name })
                },
            )
            .delete(
                |State(a): State<Shared>, h: HeaderMap, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::DestroyVm { name })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/start",
            post(
                |State(a): State<Shared>, h: HeaderMap, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::StartVm { name })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/stop",
            post(
                |State(a): State<Shared>, h: HeaderMap, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::StopVm { name })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/serial",
            get(
                |State(a): State<Shared>, h: HeaderMap, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::SerialLog { name })
                },
            ),
        )
        .with_state(agent)
}

/// `dczoned` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "dczoned",
    about = "dczone host agent: HTTP API over one host's VMs"
)]
pub struct Args {
    #[arg(long, env = "DCZONE_LAB", default_value = "dcz")]
    pub lab: String,
    #[arg(long, env = "DCZONE_STATE_DIR", default_value = "/run/dczone")]
    pub state_dir: PathBuf,
    /// The lab host this agent serves.
    #[arg(long)]
    pub host: String,
    /// Address to listen on; default: the host's lab address, port 7070.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token clients must send.
    #[arg(long)]
    pub token_file: PathBuf,
}

/// Entry point of `dczoned`.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let lab = dczone_lab::Lab::new(&args.lab, &args.state_dir, &exe)?;
    let (host, _) = lab.host(&args.host)?;
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the token file {}: {e}",
                args.token_file.display()
            )
        })?
        .trim()
        .to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        args.token_file.display()
    );
    let platform = Platform::open(lab, &dczone_image::ImageInputs::for_executable(&exe))?;
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from((host.ip(), 7070)));
    let agent = Arc::new(Agent::new(platform, args.host.clone(), token));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        eprintln!("dczoned: serving host {} on http://{listen}", args.host);
        axum::serve(listener, router(agent)).await?;
        Ok(())
    })
}
