//! A small synchronous QMP client (QEMU Machine Protocol, JSON over a unix socket).
//!
//! ```text
//! client                                  qemu
//!   | <------- {"QMP": {...}} greeting ----- |
//!   | --- {"execute":"qmp_capabilities"} --> |
//!   | <---------- {"return": {}} ----------- |
//!   | --- {"execute": C, "arguments": A} --> |
//!   | <-- {"event": E, "timestamp": ...} --- |   events may arrive at any time;
//!   | <---------- {"return": R} ------------ |   they are queued for `wait_event`
//! ```
//!
//! When QEMU offers it, the session enables out-of-band execution (`oob`): a command that
//! allows it (`migrate-pause`, `migrate-recover`) then runs in the monitor's own thread
//! even while the main loop is blocked, as a post-copy destination's is when a device
//! touches a page that a broken stream will not bring ([`Qmp::execute_oob`]).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// An asynchronous QMP event with QEMU's own timestamp (host wall clock).
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// Microseconds since the Unix epoch.
    pub timestamp_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP connection lost")]
    Io(#[source] std::io::Error),
    #[error("QMP sent malformed JSON")]
    Json(#[source] serde_json::Error),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("timed out after {0:?} waiting for QMP {1}")]
    Timeout(Duration, String),
}

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Event>,
    /// Out-of-band execution is enabled.
    oob: bool,
    /// The last out-of-band command's id.
    oob_id: u64,
    /// A line that a read timeout cut short, completed by the next read.
    partial: String,
}

impl Qmp {
    /// Connects (retrying until `timeout`, QEMU may still be starting) and negotiates.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        Self::connect_with_reads(path, timeout, Duration::from_secs(30))
    }

    /// As [`Qmp::connect`], with reads (the greeting, each answer) that fail after `reads`:
    /// QEMU serves one QMP client at a time, and a second one's greeting waits until the
    /// first leaves.
    pub fn connect_with_reads(
        path: &Path,
        timeout: Duration,
        reads: Duration,
    ) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(reads)).map_err(QmpError::Io)?;
        let writer = stream.try_clone().map_err(QmpError::Io)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            oob: false,
            oob_id: 0,
            partial: String::new(),
        };
        let greeting = qmp.read_message()?;
        let offered = greeting["QMP"]["capabilities"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "oob"));
        if offered {
            qmp.execute("qmp_capabilities", json!({ "enable": ["oob"] }))?;
            qmp.oob = true;
        } else {
            qmp.execute("qmp_capabilities", json!({}))?;
        }
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        // A timeout keeps what was read of the line (ASCII) in `partial`.
        let n = self
            .reader
            .read_line(&mut self.partial)
            .map_err(QmpError::Io)?;
        let line = std::mem::take(&mut self.partial);
        if n == 0 && line.is_empty() {
            return Err(QmpError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "QEMU closed the QMP socket",
            )));
        }
        serde_json::from_str(&line).map_err(QmpError::Json)
    }

    fn queue_if_event(&mut self, msg: &Value) -> bool {
        let Some(name) = msg.get("event").and_then(Value::as_str) else {
            return false;
        };
        let ts = &msg["timestamp"];
        let timestamp_us = ts["seconds"].as_u64().unwrap_or(0) * 1_000_000
            + ts["microseconds"].as_u64().unwrap_or(0);
        self.events.push_back(Event {
            name: name.to_string(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us,
        });
        true
    }

    /// How long a read (an answer) may take from now on.
    pub fn set_read_timeout(&mut self, reads: Duration) -> Result<(), QmpError> {
        self.writer
            .set_read_timeout(Some(reads))
            .map_err(QmpError::Io)
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.run(json!({ "execute": command }), command, arguments, None)
    }

    /// Runs a command out of band when the session allows it (in band otherwise): it is
    /// answered even while QEMU's main loop is blocked. Only commands QEMU marks
    /// `allow-oob` qualify.
    pub fn execute_oob(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        if !self.oob {
            return self.execute(command, arguments);
        }
        self.oob_id += 1;
        let id = format!("oob-{}", self.oob_id);
        let req = json!({ "exec-oob": command, "id": id });
        self.run(req, command, arguments, Some(id))
    }

    /// Reads what QEMU sends within `wait` and queues its events, for a caller that must
    /// not send an in-band command (see [`Qmp::execute_oob`]).
    pub fn poll_events(&mut self, wait: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + wait;
        while self.read_until(deadline)? {}
        Ok(())
    }

    /// Reads one message before `deadline` and queues it if it is an event. False when
    /// the deadline came first.
    fn read_until(&mut self, deadline: Instant) -> Result<bool, QmpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(QmpError::Io)?;
        let msg = self.read_message();
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(QmpError::Io)?;
        match msg {
            Ok(m) => {
                self.queue_if_event(&m);
                Ok(true)
            }
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn run(
        &mut self,
        mut req: Value,
        command: &str,
        arguments: Value,
        id: Option<String>,
    ) -> Result<Value, QmpError> {
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&req).map_err(QmpError::Json)?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(QmpError::Io)?;
        loop {
            let msg = self.read_message()?;
            if self.queue_if_event(&msg) {
                continue;
            }
            // An out-of-band answer is matched by its id.
            if id.as_deref().is_some_and(|id| msg["id"] != id) {
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
        }
    }

    /// Waits for the next event named `name` (earlier events of other names stay queued).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.events.iter().position(|e| e.name == name) {
                return Ok(self.events.remove(pos).expect("position is valid"));
            }
            if !self.read_until(deadline)? {
                return Err(QmpError::Timeout(timeout, format!("event {name}")));
            }
        }
    }

    /// Takes the queued events named `name`, leaving the others queued.
    pub fn take_events_named(&mut self, name: &str) -> Vec<Event> {
        let (taken, kept): (Vec<Event>, Vec<Event>) =
            self.events.drain(..).partition(|e| e.name == name);
        self.events = kept.into();
        taken
    }

    /// Takes every queued event.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }
}
