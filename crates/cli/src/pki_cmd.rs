//! `dczone pki`: the zone CA and its certificates (see `dczone-pki`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use dczone_pki::{Pki, Role};

use crate::print_json;
use crate::table::render;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the zone CA (`ca.crt`, and `ca.key`, mode 0600) in DIR. Never replaces one.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The zone's name, in the CA's subject.
        #[arg(long, default_value = "reference")]
        zone: String,
        #[arg(long)]
        json: bool,
    },
    /// Issue a host certificate (server and client auth, with its addresses as SANs), or,
    /// with --operator, an operator's (client auth only), or, with --consensus, one that
    /// opens etcd (an etcd member's, with --ip, or an HA agent's), signed by the zone CA in
    /// DIR.
    Issue {
        /// Host id (e.g. dc1.1-h1) or operator name.
        name: String,
        #[arg(long)]
        dir: PathBuf,
        /// An address of the host (repeat for several).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[arg(long, conflicts_with = "consensus")]
        operator: bool,
        #[arg(long)]
        consensus: bool,
        /// Validity, days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: PkiCommand) -> anyhow::Result<ExitCode> {
    match command {
        PkiCommand::Init { dir, zone, json } => {
            let pki = Pki::init(&dir, &zone)?;
            if json {
                print_json(&serde_json::json!({ "zone": zone, "ca": pki.ca_cert() }));
            } else {
                println!(
                    "zone CA for '{zone}' created: {} (its key beside it, mode 0600)",
                    pki.ca_cert().display()
                );
            }
        }
        PkiCommand::Issue {
            name,
            dir,
            ips,
            operator,
            consensus,
            days,
            json,
        } => {
            let role = match (operator, consensus) {
                (true, _) => Role::Operator,
                (_, true) => Role::Consensus,
                _ => Role::Host,
            };
            let issued = Pki::open(&dir)?.issue(role, &name, &ips, days)?;
            if json {
                print_json(&issued);
            } else {
                print!(
                    "{}",
                    render(
                        &["NAME", "ROLE", "CERTIFICATE", "KEY", "NOT AFTER"],
                        &[vec![
                            issued.name.clone(),
                            role.unit().into(),
                            issued.certificate.display().to_string(),
                            issued.key.display().to_string(),
                            issued.not_after.clone(),
                        ]]
                    )
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
