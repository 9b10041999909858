//! `dczone-guest`: the ledger service that runs inside every lab VM (started by the
//! initramfs `/init`). Standard library only, linked statically.
//!
//! Protocol, version 1: one request per line over TCP port 7000, one answer per line.
//!
//! ```text
//! T <id> <from> <to> <amount>   transfer; idempotent by <id>  -> "OK <id>" | "DUP <id>" | "ERR <why>"
//! B <account>                   balance                       -> "<balance>"
//! Z                             sum of all balances (conserved) -> "<sum>"
//! S                             continuity and consistency    -> "processed=<n> uptime_ms=<ms> checksum=<hex> boot=<id> dirty_mbps=<r> resident_mib=<m>"
//! ```
//!
//! Parameters come from the kernel command line:
//! - `dczone.resident_mib=R`: the working set. Before it serves, the guest fills R MiB with
//!   incompressible data and keeps them resident, as a real VM's memory is full of its
//!   application's data. Capped to what the kernel leaves available.
//! - `dczone.dirty_mbps=N`: memory dirtied per second, MB/s, by a background writer.
//! - `dczone.dirty_mib=M`: the area it rewrites, the first M MiB of the working set.
//!
//! A migrated VM keeps all of this state; a rebooted one starts a new `boot`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ACCOUNTS: usize = 1000;
const INITIAL_BALANCE: i64 = 1000;

struct Ledger {
    balances: Vec<i64>,
    applied: HashSet<u64>,
    processed: u64,
}

impl Ledger {
    fn checksum(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in &self.balances {
            for byte in b.to_le_bytes() {
                h ^= u64::from(byte);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}

fn cmdline_param(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cmdline").ok()?;
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
}

/// MiB the kernel says it can still give, from `/proc/meminfo`.
fn available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// Memory the guest's kernel, page cache and ledger keep for themselves when the working set
/// is capped.
const HEADROOM_MIB: u64 = 24;

/// Allocates `mib` MiB and fills it with xorshift64 output: no zero page and nothing that
/// compresses, so migration has to send every byte of it.
fn working_set(mib: u64) -> &'static mut [u8] {
    let mut area = vec![0u8; (mib as usize) << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    for word in area.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    Box::leak(area.into_boxed_slice())
}

/// Rewrites one byte per 4 KiB page of `area` so that `mbps` MB of pages are dirtied per
/// second.
fn dirty_memory(mbps: u64, area: &mut [u8]) {
    let pages = area.len() / 4096;
    let pages_per_tick = ((mbps * 1_000_000 / 4096) / 100).max(1) as usize;
    let mut page = 0usize;
    let mut value = 0u8;
    loop {
        let tick = Instant::now();
        for _ in 0..pages_per_tick {
            area[page * 4096] = value;
            page += 1;
            if page == pages {
                page = 0;
                value = value.wrapping_add(1);
            }
        }
        std::hint::black_box(&*area);
        if let Some(rest) = Duration::from_millis(10).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// What `S` reports besides the ledger.
#[derive(Clone, Copy)]
struct Workload {
    dirty_mbps: u64,
    resident_mib: u64,
}

fn serve(stream: TcpStream, ledger: Arc<Mutex<Ledger>>, started: Instant, boot: u64, w: Workload) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut out = stream;
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { return };
        let parts: Vec<&str> = line.split_whitespace().collect();
        let answer = {
            let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
            match parts.as_slice() {
                ["T", id, from, to, amount] => {
                    match (id.parse::<u64>(), from.parse::<usize>(), to.parse::<usize>(), amount.parse::<i64>()) {
                        (Ok(id), Ok(f), Ok(t), Ok(a)) if f < ACCOUNTS && t < ACCOUNTS && a >= 0 => {
                            l.processed += 1;
                            if l.applied.insert(id) {
                                l.balances[f] -= a;
                                l.balances[t] += a;
                                format!("OK {id}")
                            } else {
                                format!("DUP {id}")
                            }
                        }
                        _ => "ERR bad transfer".to_string(),
                    }
                }
                ["B", acct] => match acct.parse::<usize>() {
                    Ok(a) if a < ACCOUNTS => l.balances[a].to_string(),
                    _ => "ERR bad account".to_string(),
                },
                ["Z"] => l.balances.iter().sum::<i64>().to_string(),
                ["S"] => format!(
                    "processed={} uptime_ms={} checksum={:016x} boot={boot:016x} dirty_mbps={} resident_mib={}",
                    l.processed,
                    started.elapsed().as_millis(),
                    l.checksum(),
                    w.dirty_mbps,
                    w.resident_mib,
                ),
                _ => "ERR unknown request".to_string(),
            }
        };
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

fn main() {
    let started = Instant::now();
    let boot = std::fs::read("/proc/sys/kernel/random/boot_id")
        .map(|b| {
            b.iter()
                .fold(0u64, |h, &c| h.wrapping_mul(31).wrapping_add(u64::from(c)))
        })
        .unwrap_or(0);
    let dirty = cmdline_param("dczone.dirty_mbps").unwrap_or(0);
    let dirty_mib = cmdline_param("dczone.dirty_mib").unwrap_or(32);
    let wanted = cmdline_param("dczone.resident_mib").unwrap_or(0);
    let cap = available_mib().map_or(wanted, |a| a.saturating_sub(HEADROOM_MIB));
    let resident_mib = wanted.min(cap);
    if resident_mib < wanted {
        println!(
            "dczone-guest: working set capped at {resident_mib} MiB of {wanted} (available memory)"
        );
    }
    let fill = Instant::now();
    let area = working_set(resident_mib.max(if dirty > 0 { dirty_mib } else { 0 }));
    println!(
        "dczone-guest: working set of {} MiB filled in {} ms",
        area.len() >> 20,
        fill.elapsed().as_millis()
    );
    let workload = Workload {
        dirty_mbps: dirty,
        resident_mib: (area.len() >> 20) as u64,
    };
    if dirty > 0 {
        let (dirty_area, _) = area.split_at_mut((dirty_mib as usize) << 20);
        std::thread::spawn(move || dirty_memory(dirty, dirty_area));
    }
    let ledger = Arc::new(Mutex::new(Ledger {
        balances: vec![INITIAL_BALANCE; ACCOUNTS],
        applied: HashSet::new(),
        processed: 0,
    }));
    let listener = TcpListener::bind("0.0.0.0:7000").expect("bind port 7000");
    println!("dczone-guest: ledger listening on :7000 (dirty {dirty} MB/s over {dirty_mib} MiB)");
    for stream in listener.incoming().flatten() {
        let ledger = ledger.clone();
        std::thread::spawn(move || serve(stream, ledger, started, boot, workload));
    }
}
