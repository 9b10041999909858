//! Thin wrappers over the system: `ip` commands, namespaces, capabilities, processes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::LabError;

/// Runs `ip ARGS...`; a failure carries the step, the command line and ip's stderr.
pub fn ip(step: &str, args: &[&str]) -> Result<(), LabError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            what: "ip (package iproute2)".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            step: step.to_string(),
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip -n NS LINE` for each line (arguments split on whitespace: names, addresses and
/// MACs of the lab never contain spaces), stopping at the first failure.
pub fn ip_script(step: &str, ns: &str, lines: &[String]) -> Result<(), LabError> {
    for line in lines {
        let mut args = vec!["-n", ns];
        args.extend(line.split_whitespace());
        ip(step, &args)?;
    }
    Ok(())
}

/// Names of all network namespaces on this machine.
pub fn namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn namespace_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Pids of every process whose network namespace is `name`.
pub fn pids_in_namespace(name: &str) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(Path::new("/run/netns").join(name)) else {
        return Vec::new();
    };
    use std::os::unix::fs::MetadataExt;
    let (dev, ino) = (target.dev(), target.ino());
    let mut pids = Vec::new();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in proc_dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.dev() == dev && m.ino() == ino {
                pids.push(pid);
            }
        }
    }
    pids
}

pub fn kill(pid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; a stale pid yields ESRCH, which we ignore.
    unsafe { libc::kill(pid, signal) };
}

pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Checks for CAP_NET_ADMIN and CAP_SYS_ADMIN (namespaces) in the effective set.
pub fn missing_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let mut missing = Vec::new();
    if eff & (1 << 12) == 0 {
        missing.push("CAP_NET_ADMIN");
    }
    if eff & (1 << 21) == 0 {
        missing.push("CAP_SYS_ADMIN");
    }
    missing
}

/// Runs `f` on a new thread that has joined network namespace `ns`. Sockets created there
/// stay in that namespace wherever they are used later. Never call this on an async worker:
/// it spawns a dedicated thread precisely so that no shared thread changes namespace.
pub fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, LabError> {
    let file = File::open(Path::new("/run/netns").join(ns)).map_err(|source| LabError::Io {
        what: format!("open namespace {ns}"),
        source,
    })?;
    let ns = ns.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            // SAFETY: setns on a namespace fd we opened; it affects only this new thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert!(
                rc == 0,
                "setns into {ns} failed: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .map_err(|source| LabError::Io {
            what: "spawn namespace thread".into(),
            source,
        })?;
    Ok(handle)
}
