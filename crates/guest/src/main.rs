//! `dczone-guest`: the ledger service that runs inside every lab VM (started by the
//! initramfs `/init`), linked statically. The ledger is standard library only; the AP mode
//! ([`ap`]) adds a PostgreSQL client (tokio-postgres over rustls).
//!
//! Protocol, version 1: one request per line over TCP port 7000, one answer per line.
//!
//! ```text
//! T <id> <from> <to> <amount>   transfer; idempotent by <id>  -> "OK <id>" | "DUP <id>" | "ERR <why>"
//! B <account>                   balance                       -> "<balance>"
//! Z                             sum of all balances (conserved) -> "<sum>"
//! S                             continuity and consistency    -> "processed=<n> uptime_ms=<ms> checksum=<hex> boot=<id> dirty_mbps=<r> resident_mib=<m> journal=<n> replayed=<n>"
//! C                             checkpoint (a backup's sync point) -> "CP <journal position> <checksum>" | "ERR <why>"
//! D <host> <port> <db> <user> <password> <ca-pem-hex>
//!                               AP mode: the ledger database to use -> "DB OK rtt_us=<median> round_trips=<per A>" | "ERR <why>"
//! A <id> <from> <to> <amount>   AP mode: the transfer as one database transaction ([`ap`])
//!                               -> "OK|DUP <id> <payer's balance> <db µs>" | "ERR <why>"
//! P                             AP mode: one round trip to the database -> "RTT <µs>"
//! F <mib>                       write <mib> MiB of data to the disk's second half (the data at rest a
//!                               backup or a migration moves), flushed -> "FILLED <mib>" | "ERR <why>"
//! ```
//!
//! **The journal.** A VM with a disk (`/dev/vda`) journals every transfer it applies there
//! and answers `OK` only once the record is durable (written and flushed: QEMU passes the
//! flush to the storage cluster, which acknowledges it once every replica holds it). A
//! writer thread commits the records of concurrent requests together (group commit). At
//! boot the guest replays the journal, so a VM started from a copy of its disk holds every
//! transfer acknowledged before the copy. `C` holds new transfers, waits until every
//! applied one is durable, and answers the journal's position: a point that any later
//! snapshot of the disk contains. Without a disk, `journal=0` and `C` answers `ERR`.
//!
//! Journal layout: from byte 4096 of the disk, one 32-byte record per applied transfer,
//! little-endian: `id u64 | from u32 | to u32 | amount i64 | seq u32 | check u32`, where
//! `seq` counts from 1 and `check` is FNV-1a (32 bits) of the first 28 bytes. Replay stops
//! at the first record whose `seq` or `check` does not follow (a never-written, zeroed
//! disk included).
//!
//! Parameters come from the kernel command line:
//! - `dczone.resident_mib=R`: the working set. Before it serves, the guest fills R MiB with
//!   incompressible data and keeps them resident, as a real VM's memory is full of its
//!   application's data. Capped to what the kernel leaves available.
//! - `dczone.dirty_mbps=N`: memory dirtied per second, MB/s, by a background writer.
//! - `dczone.dirty_mib=M`: the area it rewrites, the first M MiB of the working set.
//!
//! A migrated VM keeps all of this state; a rebooted one starts a new `boot`.

mod ap;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const ACCOUNTS: usize = 1000;
const INITIAL_BALANCE: i64 = 1000;

struct Ledger {
    balances: Vec<i64>,
    applied: HashSet<u64>,
    processed: u64,
    /// Records replayed from the journal at boot.
    replayed: u64,
}

/// The journal's device, its first record's offset, and a record's size.
const JOURNAL_DEV: &str = "/dev/vda";
const JOURNAL_START: u64 = 4096;
const RECORD: usize = 32;

fn fnv32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn encode_record(seq: u32, id: u64, from: usize, to: usize, amount: i64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0..8].copy_from_slice(&id.to_le_bytes());
    r[8..12].copy_from_slice(&(from as u32).to_le_bytes());
    r[12..16].copy_from_slice(&(to as u32).to_le_bytes());
    r[16..24].copy_from_slice(&amount.to_le_bytes());
    r[24..28].copy_from_slice(&seq.to_le_bytes());
    let check = fnv32(&r[..28]);
    r[28..32].copy_from_slice(&check.to_le_bytes());
    r
}

/// A record's (id, from, to, amount) if it is record number `seq`.
fn decode_record(r: &[u8], seq: u32) -> Option<(u64, usize, usize, i64)> {
    let word = |a: usize| u32::from_le_bytes(r[a..a + 4].try_into().expect("4 bytes"));
    if word(24) != seq || word(28) != fnv32(&r[..28]) {
        return None;
    }
    let id = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
    let amount = i64::from_le_bytes(r[16..24].try_into().expect("8 bytes"));
    Some((id, word(8) as usize, word(12) as usize, amount))
}

/// What the request threads and the journal's writer share.
struct JournalState {
    /// Records applied (and queued), and records durable on the disk.
    appended: u64,
    durable: u64,
    /// Encoded records not yet written.
    pending: Vec<u8>,
    /// Set when a write or a flush failed: no transfer is acknowledged any more.
    failed: Option<String>,
}

struct Journal {
    state: Mutex<JournalState>,
    /// Signals new records (to the writer) and new durable ones (to the requests).
    changed: Condvar,
}

impl Journal {
    fn lock(&self) -> std::sync::MutexGuard<'_, JournalState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one applied transfer; its position.
    fn append(&self, id: u64, from: usize, to: usize, amount: i64) -> u64 {
        let mut s = self.lock();
        s.appended += 1;
        let rec = encode_record(s.appended as u32, id, from, to, amount);
        s.pending.extend_from_slice(&rec);
        self.changed.notify_all();
        s.appended
    }

    /// Waits until record `pos` is durable.
    fn wait_durable(&self, pos: u64) -> Result<(), String> {
        let mut s = self.lock();
        loop {
            if let Some(e) = &s.failed {
                return Err(e.clone());
            }
            if s.durable >= pos {
                return Ok(());
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The writer: writes and flushes whatever is queued, as one commit.
    fn write_loop(&self, disk: File, size: u64) {
        loop {
            let (bytes, first) = {
                let mut s = self.lock();
                while s.pending.is_empty() {
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                (std::mem::take(&mut s.pending), s.durable)
            };
            let n = (bytes.len() / RECORD) as u64;
            let at = JOURNAL_START + first * RECORD as u64;
            let result = if at + bytes.len() as u64 > size {
                Err(format!(
                    "journal full: the disk holds {} records",
                    (size - JOURNAL_START) / RECORD as u64
                ))
            } else {
                disk.write_all_at(&bytes, at)
                    .and_then(|()| disk.sync_data())
                    .map_err(|e| format!("journal write: {e}"))
            };
            let mut s = self.lock();
            match result {
                Ok(()) => s.durable = first + n,
                Err(e) => {
                    println!("dczone-guest: {e}; no transfer is acknowledged any more");
                    s.failed = Some(e);
                }
            }
            self.changed.notify_all();
            if s.failed.is_some() {
                return;
            }
        }
    }
}

/// Writes `mib` MiB of incompressible data from the middle of the disk and flushes it.
fn fill_disk(mib: u64) -> Result<String, String> {
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(JOURNAL_DEV)
        .map_err(|e| format!("open {JOURNAL_DEV}: {e}"))?;
    let size = {
        use std::io::Seek;
        let mut d = &disk;
        d.seek(std::io::SeekFrom::End(0))
            .map_err(|e| e.to_string())?
    };
    let start = size / 2;
    if start + (mib << 20) > size {
        return Err(format!(
            "the disk's second half holds {} MiB",
            (size - start) >> 20
        ));
    }
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id()) ^ mib;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        disk.write_all_at(&block, start + (i << 20))
            .map_err(|e| format!("write: {e}"))?;
    }
    disk.sync_data().map_err(|e| format!("flush: {e}"))?;
    Ok(format!("FILLED {mib}"))
}

/// Opens the disk and replays its journal into `ledger`; the journal (and its writer
/// thread) if the VM has a disk.
fn open_journal(ledger: &mut Ledger) -> Option<Arc<Journal>> {
    let disk = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(JOURNAL_DEV)
    {
        Ok(d) => d,
        // A VM given a disk (`dczone.disk=1`) never serves without its journal: it would
        // acknowledge transfers that no copy of its disk holds.
        Err(e) if cmdline_param("dczone.disk") == Some(1) => {
            println!("dczone-guest: the VM has a disk but {JOURNAL_DEV} does not open: {e}");
            std::process::exit(1);
        }
        Err(_) => return None,
    };
    let size = {
        use std::io::Seek;
        let mut d = &disk;
        d.seek(std::io::SeekFrom::End(0)).unwrap_or(0)
    };
    // The journal has the disk's first half; `F` writes data at rest in the second.
    let size = size / 2;
    let t = Instant::now();
    let mut seq: u32 = 1;
    let mut at = JOURNAL_START;
    let mut chunk = vec![0u8; 1 << 20];
    'read: while at < size {
        let len = chunk.len().min((size - at) as usize);
        if disk.read_exact_at(&mut chunk[..len], at).is_err() {
            break;
        }
        for r in chunk[..len].chunks_exact(RECORD) {
            let Some((id, from, to, amount)) = decode_record(r, seq) else {
                break 'read;
            };
            if from < ACCOUNTS && to < ACCOUNTS && ledger.applied.insert(id) {
                ledger.balances[from] -= amount;
                ledger.balances[to] += amount;
            }
            seq += 1;
        }
        at += len as u64;
    }
    let records = u64::from(seq - 1);
    ledger.replayed = records;
    // A commit cut short by a crash may have left records of its group past the first
    // damaged one: zeroed (1 MiB, more than any group), so that a later replay cannot
    // take them as following the records written from now on.
    let end = JOURNAL_START + records * RECORD as u64;
    let len = (1u64 << 20).min(size.saturating_sub(end));
    if disk
        .write_all_at(&vec![0u8; len as usize], end)
        .and_then(|()| disk.sync_data())
        .is_err()
    {
        println!("dczone-guest: cannot clear the journal's tail; serving without a journal would lose acknowledged transfers");
        std::process::exit(1);
    }
    println!(
        "dczone-guest: journal on {JOURNAL_DEV} ({} MiB): {records} transfers replayed in {} ms",
        size >> 20,
        t.elapsed().as_millis()
    );
    let journal = Arc::new(Journal {
        state: Mutex::new(JournalState {
            appended: records,
            durable: records,
            pending: Vec::new(),
            failed: None,
        }),
        changed: Condvar::new(),
    });
    let writer = journal.clone();
    std::thread::spawn(move || writer.write_loop(disk, size));
    Some(journal)
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

/// The AP mode's database, set by `D` (none until then).
static DATABASE: Mutex<Option<ap::Target>> = Mutex::new(None);

/// The AP mode's requests (`D`, `A`, `P`), answered outside the ledger; `None` for the
/// ledger's own.
fn application(parts: &[&str], session: &mut Option<ap::Session>) -> Option<String> {
    let target = || DATABASE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let open = |session: &mut Option<ap::Session>| -> Result<(), String> {
        if session.is_none() {
            let t = target().ok_or("no database: send D first")?;
            *session = Some(ap::Session::open(&t)?);
        }
        Ok(())
    };
    let answer = match parts {
        ["D", args @ ..] => (|| {
            let t = ap::Target::parse(args)?;
            let mut s = ap::Session::open(&t)?;
            let mut rtts = (0..31)
                .map(|_| s.ping())
                .collect::<Result<Vec<u64>, String>>()?;
            rtts.sort_unstable();
            *DATABASE.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
            *session = Some(s);
            Ok::<_, String>(format!(
                "DB OK rtt_us={} round_trips={}",
                rtts[rtts.len() / 2],
                ap::ROUND_TRIPS
            ))
        })()
        .unwrap_or_else(|e| format!("ERR {e}")),
        ["A", id, from, to, amount] => {
            match (
                id.parse::<u64>(),
                from.parse::<i32>(),
                to.parse::<i32>(),
                amount.parse::<i64>(),
            ) {
                (Ok(id), Ok(f), Ok(t), Ok(a))
                    if (1..=ACCOUNTS as i32).contains(&f)
                        && (1..=ACCOUNTS as i32).contains(&t)
                        && f != t
                        && a >= 0 =>
                {
                    match open(session)
                        .and_then(|()| session.as_mut().expect("opened").transfer(id, f, t, a))
                    {
                        Ok(r) => format!(
                            "{} {id} {} {}",
                            if r.new { "OK" } else { "DUP" },
                            r.balance,
                            r.db_us
                        ),
                        Err(e) => {
                            // A broken session is reopened at the next request; a failed
                            // transaction leaves a working one.
                            if session.as_ref().is_some_and(ap::Session::closed) {
                                *session = None;
                            }
                            format!("ERR {e}")
                        }
                    }
                }
                _ => "ERR bad transfer: A <id> <from 1..1000> <to 1..1000, not from> <amount>"
                    .to_string(),
            }
        }
        ["P"] => match open(session).and_then(|()| session.as_mut().expect("opened").ping()) {
            Ok(us) => format!("RTT {us}"),
            Err(e) => {
                if session.as_ref().is_some_and(ap::Session::closed) {
                    *session = None;
                }
                format!("ERR {e}")
            }
        },
        _ => return None,
    };
    Some(answer)
}

/// What `S` reports besides the ledger.
#[derive(Clone, Copy)]
struct Workload {
    dirty_mbps: u64,
    resident_mib: u64,
}

fn serve(
    stream: TcpStream,
    ledger: Arc<Mutex<Ledger>>,
    journal: Option<Arc<Journal>>,
    started: Instant,
    boot: u64,
    w: Workload,
) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut out = stream;
    // This connection's database session, opened at its first `A` (AP mode).
    let mut session: Option<ap::Session> = None;
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { return };
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let Some(answer) = application(&parts, &mut session) {
            if writeln!(out, "{answer}").is_err() {
                return;
            }
            continue;
        }
        // A transfer's answer waits (outside the ledger's lock) until its record, or the
        // record of the transfer it repeats, is durable.
        let mut durable_at = None;
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
                                durable_at = journal.as_ref().map(|j| j.append(id, f, t, a));
                                format!("OK {id}")
                            } else {
                                durable_at = journal.as_ref().map(|j| j.lock().appended);
                                format!("DUP {id}")
                            }
                        }
                        _ => "ERR bad transfer".to_string(),
                    }
                }
                ["C"] => match &journal {
                    // Held under the ledger's lock: no transfer is applied meanwhile.
                    Some(j) => {
                        let pos = j.lock().appended;
                        match j.wait_durable(pos) {
                            Ok(()) => format!("CP {pos} {:016x}", l.checksum()),
                            Err(e) => format!("ERR {e}"),
                        }
                    }
                    None => "ERR no disk: this VM has no journal".to_string(),
                },
                ["B", acct] => match acct.parse::<usize>() {
                    Ok(a) if a < ACCOUNTS => l.balances[a].to_string(),
                    _ => "ERR bad account".to_string(),
                },
                ["Z"] => l.balances.iter().sum::<i64>().to_string(),
                ["F", mib] => match (mib.parse::<u64>(), &journal) {
                    (Ok(mib), Some(_)) => fill_disk(mib).unwrap_or_else(|e| format!("ERR {e}")),
                    (Err(_), _) => "ERR bad size".to_string(),
                    (_, None) => "ERR no disk".to_string(),
                },
                ["S"] => format!(
                    "processed={} uptime_ms={} checksum={:016x} boot={boot:016x} dirty_mbps={} resident_mib={} journal={} replayed={}",
                    l.processed,
                    started.elapsed().as_millis(),
                    l.checksum(),
                    w.dirty_mbps,
                    w.resident_mib,
                    journal.as_ref().map_or(0, |j| j.lock().durable),
                    l.replayed,
                ),
                _ => "ERR unknown request".to_string(),
            }
        };
        let answer = match (durable_at, &journal) {
            (Some(pos), Some(j)) => match j.wait_durable(pos) {
                Ok(()) => answer,
                Err(e) => format!("ERR {e}"),
            },
            _ => answer,
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
    let mut ledger = Ledger {
        balances: vec![INITIAL_BALANCE; ACCOUNTS],
        applied: HashSet::new(),
        processed: 0,
        replayed: 0,
    };
    let journal = open_journal(&mut ledger);
    let ledger = Arc::new(Mutex::new(ledger));
    let listener = TcpListener::bind("0.0.0.0:7000").expect("bind port 7000");
    println!("dczone-guest: ledger listening on :7000 (dirty {dirty} MB/s over {dirty_mib} MiB)");
    for stream in listener.incoming().flatten() {
        let ledger = ledger.clone();
        let journal = journal.clone();
        std::thread::spawn(move || serve(stream, ledger, journal, started, boot, workload));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_only_as_the_record_it_is() {
        let r = encode_record(7, 42, 3, 9, 150);
        assert_eq!(decode_record(&r, 7), Some((42, 3, 9, 150)));
        assert_eq!(decode_record(&r, 8), None, "out of sequence");
        let mut bad = r;
        bad[16] ^= 1;
        assert_eq!(decode_record(&bad, 7), None, "a flipped bit");
        assert_eq!(decode_record(&[0u8; RECORD], 1), None, "a zeroed disk");
    }
}
