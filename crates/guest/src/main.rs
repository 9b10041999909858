//! `dczone-guest`: the ledger service that runs inside every lab VM (started by the
//! initramfs `/init`). Standard library only, linked statically.
//!
//! Protocol, version 1: one request per line over TCP port 7000, one answer per line.
//!
//! ```text
//! T <id> <from> <to> <amount>   transfer; idempotent by <id>  -> "OK <id>" | "DUP <id>" | "ERR <why>"
//! B <account>                   balance                       -> "<balance>"
//! Z                             sum of all balances (conserved) -> "<sum>"
//! S                             continuity and consistency    -> "processed=<n> uptime_ms=<ms> checksum=<hex> boot=<id> dirty_mbps=<r>"
//! ```
//!
//! Parameters come from the kernel command line: `dczone.dirty_mbps=N` (memory dirtied per
//! second, MB/s, by a background writer) and `dczone.dirty_mib=M` (size of the area it
//! rewrites). A migrated VM keeps all of this state; a rebooted one starts a new `boot`.

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

/// Rewrites one byte per 4 KiB page of a `mib` MiB area so that `mbps` MB of pages are
/// dirtied per second.
fn dirty_memory(mbps: u64, mib: u64) {
    let pages = (mib as usize * 1024 * 1024) / 4096;
    let mut area = vec![0u8; pages * 4096];
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
        std::hint::black_box(&area);
        if let Some(rest) = Duration::from_millis(10).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

fn serve(stream: TcpStream, ledger: Arc<Mutex<Ledger>>, started: Instant, boot: u64, dirty: u64) {
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
                    "processed={} uptime_ms={} checksum={:016x} boot={boot:016x} dirty_mbps={dirty}",
                    l.processed,
                    started.elapsed().as_millis(),
                    l.checksum()
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
    if dirty > 0 {
        std::thread::spawn(move || dirty_memory(dirty, dirty_mib));
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
        std::thread::spawn(move || serve(stream, ledger, started, boot, dirty));
    }
}
