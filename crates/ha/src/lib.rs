//! The HA manager: one agent per database site (see [`agent`]), coordinating through etcd;
//! its decisions are pure functions in [`decide`].

pub mod agent;
pub mod control;
pub mod decide;
pub mod keys;
pub mod manual;
