//! Bulk cross traffic: TCP flows that fill a path, standing in for the backup and bulk
//! replication traffic that shares the inter-DC links with the database (SPEC.md
//! section 9: normal inter-DC traffic, up to twice that during replication or backup).
//!
//! The flows use the emulator's bulk port ([`dczone_apn::control::BULK_PORT`]), so an APN
//! path gives them a lane of their own and a conventional WAN makes them share the pipe.
//! They keep going through cuts: a sender whose connection fails, or cannot write for
//! 2 s, connects again, so the traffic resumes when the path does.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use dczone_apn::control::BULK_PORT;

use crate::{sys, Lab, LabError};

/// Running cross traffic; [`CrossTraffic::stop`] ends it and reports what it moved.
#[derive(Debug)]
pub struct CrossTraffic {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    started: Instant,
    threads: Vec<JoinHandle<()>>,
    pub from: String,
    pub to: String,
    pub flows: usize,
}

/// What the cross traffic moved.
#[derive(Debug, Clone, Serialize)]
pub struct CrossReport {
    pub from: String,
    pub to: String,
    pub flows: usize,
    pub bytes: u64,
    pub seconds: f64,
    /// Lab throughput (the path's lab rate is its real bandwidth / lab_scale).
    pub lab_mbit: f64,
}

impl Lab {
    /// Starts `flows` TCP flows from host `from` to host `to`, sending as fast as the path
    /// takes them.
    pub fn cross_traffic(
        &self,
        from: &str,
        to: &str,
        flows: usize,
    ) -> Result<CrossTraffic, LabError> {
        let (_, ns_from) = self.host(from)?;
        let (to_ref, ns_to) = self.host(to)?;
        let ip: Ipv4Addr = to_ref.ip();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        {
            let (stop, received) = (stop.clone(), received.clone());
            threads.push(sys::in_namespace(&ns_to, move || {
                receive(ready_tx, stop, received)
            })?);
        }
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stop.store(true, Ordering::SeqCst);
                return Err(LabError::BadValue {
                    field: format!("cross traffic receiver on {to}"),
                    reason: e,
                });
            }
            Err(_) => {
                stop.store(true, Ordering::SeqCst);
                return Err(LabError::BadValue {
                    field: format!("cross traffic receiver on {to}"),
                    reason: "did not start within 5 s".into(),
                });
            }
        }
        for _ in 0..flows {
            let stop = stop.clone();
            threads.push(sys::in_namespace(&ns_from, move || send(ip, stop))?);
        }
        Ok(CrossTraffic {
            stop,
            received,
            started: Instant::now(),
            threads,
            from: from.to_string(),
            to: to.to_string(),
            flows,
        })
    }
}

impl CrossTraffic {
    pub fn stop(self) -> CrossReport {
        self.stop.store(true, Ordering::SeqCst);
        let seconds = self.started.elapsed().as_secs_f64();
        for t in self.threads {
            let _ = t.join();
        }
        let bytes = self.received.load(Ordering::SeqCst);
        CrossReport {
            from: self.from,
            to: self.to,
            flows: self.flows,
            bytes,
            seconds,
            lab_mbit: bytes as f64 * 8.0 / seconds.max(1e-9) / 1e6,
        }
    }
}

fn receive(
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
) {
    let listener = match TcpListener::bind(("0.0.0.0", BULK_PORT))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
    {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("bind port {BULK_PORT}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut readers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let (stop, received) = (stop.clone(), received.clone());
                readers.push(std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut buf = vec![0u8; 256 * 1024];
                    while !stop.load(Ordering::SeqCst) {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                received.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => break,
                        }
                    }
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    for r in readers {
        let _ = r.join();
    }
}

/// A sender that could not write for this long starts a new connection.
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

fn send(ip: Ipv4Addr, stop: Arc<AtomicBool>) {
    let chunk = vec![0xa5u8; 128 * 1024];
    let addr = SocketAddr::from((ip, BULK_PORT));
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
        let mut moved_at = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            match s.write(&chunk) {
                Ok(_) => moved_at = Instant::now(),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
            // A connection stuck behind a cut retransmits with exponential back-off long
            // after the path is back: a new one resumes at once.
            if moved_at.elapsed() > RECONNECT_AFTER {
                break;
            }
        }
    }
}
