//! The APN emulator: dczone's own userspace WAN data path.
//!
//! One L2 switch with a port per site (a TAP enslaved to the site's bridge) and MAC
//! learning. Every directed pair of ports is a [`path::Path`]: a serializer at the path's
//! bandwidth, a queue capped at a multiple of the bandwidth-delay product, and a
//! constant-delay FIFO, with optional jitter and loss for a conventional WAN.
//!
//! The emulator knows nothing of sites, routes, VMs or databases: it is given ports and
//! paths by its configuration and by the control socket ([`control`]).

pub mod control;
pub mod engine;
pub mod frame;
pub mod path;
pub mod switch;
mod tap;

pub use control::{EmulatorConfig, PathConfig, PortConfig, Request, Response, Stats};
pub use engine::{Engine, EngineError};
pub use path::PathParams;
