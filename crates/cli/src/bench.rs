//! `dczone bench ...`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {}

pub fn run(_state_dir: &Path, _exe: &Path, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {}
}
