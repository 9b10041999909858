//! `dczone bench ...`: each benchmark prints a table and can write its JSON to a file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use indicatif::ProgressBar;

use crate::table::render;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// APN emulator fidelity (delay, rate), capacity and memory.
    Wan {
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Measured runs per figure (after one warm-up).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

pub fn run(state_dir: &Path, exe: &Path, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Wan { json, runs } => {
            if runs == 0 {
                anyhow::bail!("--runs must be at least 1");
            }
            let lab = dczone_lab::Lab::new("dczbench", state_dir, exe)?;
            let bar = ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(100));
            let report = lab.wan_bench(runs, &|msg| bar.set_message(msg.to_string()))?;
            bar.finish_and_clear();
            let rows: Vec<_> = report
                .measurements
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        format!("{:.3}", m.min),
                        format!("{:.3}", m.median),
                        format!("{:.3}", m.max),
                        m.target.clone(),
                        m.pass
                            .map_or("-".into(), |p| if p { "pass" } else { "MISS" }.into()),
                    ]
                })
                .collect();
            println!("bench wan @ {} ({} runs each)", report.git_rev, report.runs);
            print!(
                "{}",
                render(
                    &["MEASUREMENT", "MIN", "MEDIAN", "MAX", "TARGET", "VERDICT"],
                    &rows
                )
            );
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
