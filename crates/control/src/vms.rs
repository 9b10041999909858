//! The VM lifecycle through the zone's host agents, as `dczone vm` drives it: each call goes
//! to the agent of the VM's host, found by asking the agents (never a shared file).

use std::time::Duration;

use anyhow::Context;

use dczone_agent::access::AccessError;
use dczone_virt::{CreateVm, VmRecord};

use crate::ZoneAgents;

/// How long a VM may take to boot under TCG on a busy host.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a call that changes no guest state may take.
const SHORT: Duration = Duration::from_secs(30);

fn record(v: serde_json::Value) -> anyhow::Result<VmRecord> {
    Ok(serde_json::from_value(v)?)
}

/// Calls the agent of `name`'s host. Once more if the record moved meanwhile: an agent
/// that starts settles a migration its host's VM was left in, which may move it. Returns
/// the host that answered and its answer.
fn on_vm(
    agents: &dyn ZoneAgents,
    name: &str,
    method: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(String, serde_json::Value)> {
    let host = agents.host_of(name)?;
    match agents.call(&host, method, path, None, timeout) {
        Ok(v) => Ok((host, v)),
        Err(e) => {
            let now = agents.host_of(name)?;
            if now == host {
                return Err(e);
            }
            agents
                .call(&now, method, path, None, timeout)
                .map(|v| (now, v))
        }
    }
}

/// Creates and boots `vm` on its host after checking that no agent of the zone knows the
/// name (a name is the VM's in the whole zone, not only on one host).
pub fn create(agents: &dyn ZoneAgents, vm: &CreateVm) -> anyhow::Result<VmRecord> {
    agents.check_host(&vm.host)?;
    match agents.host_of(&vm.name) {
        Ok(on) => anyhow::bail!(
            "VM '{}' already exists (on {on}); pick another name",
            vm.name
        ),
        Err(e) => {
            if let Some(AccessError::UnknownVm { unreachable, .. }) = e.downcast_ref() {
                if !unreachable.is_empty() {
                    anyhow::bail!(
                        "cannot tell whether the name '{}' is free: the agents of {} did not \
                         answer",
                        vm.name,
                        unreachable.join(", ")
                    );
                }
            }
        }
    }
    boot(agents, vm)
}

/// Creates and boots `vm` through its host's agent, without asking the others about the
/// name (its host's agent still refuses a name it has).
pub fn boot(agents: &dyn ZoneAgents, vm: &CreateVm) -> anyhow::Result<VmRecord> {
    let body = serde_json::json!({
        "name": vm.name,
        "memory_mib": vm.memory_mib,
        "dirty_mbps": vm.dirty_mbps,
        "dirty_mib": vm.dirty_mib,
        "resident_pct": vm.resident_pct,
        "group": vm.group,
        "disk_mib": vm.disk_mib,
        "disk_image": vm.disk_image,
    });
    record(
        agents
            .call(&vm.host, "POST", "/v1/vms", Some(body), BOOT_TIMEOUT)
            .with_context(|| format!("create {} on {}", vm.name, vm.host))?,
    )
}

/// Creates and boots `vms` at once (under TCG each guest takes seconds to boot).
pub fn boot_all(agents: &(dyn ZoneAgents + Sync), vms: &[CreateVm]) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let boots: Vec<_> = vms
            .iter()
            .map(|vm| s.spawn(move || boot(agents, vm)))
            .collect();
        for b in boots {
            b.join()
                .map_err(|_| anyhow::anyhow!("VM creation thread panicked"))??;
        }
        Ok(())
    })
}

pub fn start(agents: &dyn ZoneAgents, name: &str) -> anyhow::Result<VmRecord> {
    let path = format!("/v1/vms/{name}/start");
    record(on_vm(agents, name, "POST", &path, BOOT_TIMEOUT)?.1)
}

pub fn stop(agents: &dyn ZoneAgents, name: &str) -> anyhow::Result<()> {
    on_vm(agents, name, "POST", &format!("/v1/vms/{name}/stop"), SHORT)?;
    Ok(())
}

pub fn destroy(agents: &dyn ZoneAgents, name: &str) -> anyhow::Result<()> {
    on_vm(agents, name, "DELETE", &format!("/v1/vms/{name}"), SHORT)?;
    Ok(())
}

/// Destroys `name` if the zone has it.
pub fn destroy_if_present(agents: &dyn ZoneAgents, name: &str) -> anyhow::Result<()> {
    let Some(vm) = agents.list()?.into_iter().find(|v| v.spec.name == name) else {
        return Ok(());
    };
    agents
        .call(&vm.host, "DELETE", &format!("/v1/vms/{name}"), None, SHORT)
        .with_context(|| format!("destroy {name} on {}", vm.host))?;
    Ok(())
}

/// `name`'s record, from its host's agent, and that host.
pub fn show(agents: &dyn ZoneAgents, name: &str) -> anyhow::Result<(String, VmRecord)> {
    let (host, v) = on_vm(agents, name, "GET", &format!("/v1/vms/{name}"), SHORT)?;
    Ok((host, record(v)?))
}

/// The last `lines` lines of `name`'s serial console, from `host`'s agent.
pub fn serial(
    agents: &dyn ZoneAgents,
    host: &str,
    name: &str,
    lines: usize,
) -> anyhow::Result<Vec<String>> {
    let log = agents.call(host, "GET", &format!("/v1/vms/{name}/serial"), None, SHORT)?;
    let log = log["serial"].as_str().unwrap_or_default();
    let mut tail: Vec<String> = log.lines().rev().take(lines).map(str::to_string).collect();
    tail.reverse();
    Ok(tail)
}
