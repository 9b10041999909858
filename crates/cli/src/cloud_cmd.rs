//! `dczone cloud ...`: the public cloud as a separate party, reached through its API with
//! the account's keys (`dczone_control::cloud`, `dczone_cloud`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use dczone_control::cloud;
use dczone_control::cloud::inventory;
use dczone_lab::Lab;

use crate::print_json;
use crate::table::render;

#[derive(Debug, Subcommand)]
pub enum CloudCommand {
    /// Start the lab's cloud provider on the public-cloud site's host (its own Ceph with
    /// an S3 gateway, and its compute API); print its account.
    Up {
        #[arg(long)]
        json: bool,
    },
    /// What a user of the cloud gets from its console: the endpoints, keys and bucket.
    Account {
        #[arg(long)]
        json: bool,
    },
    /// A key pair of the account that expires (as a cloud's console issues one): prints
    /// the account with that key, for `cloud migrate --account FILE`.
    Key {
        /// Seconds until the key expires (1 to 43200).
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
        #[arg(long)]
        json: bool,
    },
    /// Migrate running VMs to the cloud, one after another: export, convert, transfer,
    /// import, settings, start. The VMs keep running where they are.
    Migrate {
        #[arg(required = true)]
        vms: Vec<String>,
        /// The image format the cloud imports: vmdk, vhd, raw or qcow2.
        #[arg(long, default_value = "vmdk")]
        format: String,
        /// Multipart upload part size, MiB (at least 5). A streamed image (VMDK, raw) sends
        /// a part as soon as it is made: small parts start the upload sooner and end it
        /// sooner after the image's last byte.
        #[arg(long, default_value_t = 5)]
        part_mib: u64,
        /// Parts in flight at once.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// Start the instances in these security groups (`sg-...`) instead of one made for
        /// each VM with its application port open to the zone.
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        /// Stop each VM before its export (a cold move): its downtime is reported against
        /// --downtime-reference-ms; a failed move starts it again.
        #[arg(long)]
        stop_source: bool,
        /// The downtime a cold move is judged against, ms.
        #[arg(long, default_value_t = cloud::DOWNTIME_REFERENCE_MS)]
        downtime_reference_ms: f64,
        /// The cloud account (JSON: region, s3_endpoint, compute_endpoint, access_key,
        /// secret_key, bucket) instead of the lab's cloud.
        #[arg(long)]
        account: Option<PathBuf>,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// What the account holds in the cloud: instances, images and security groups (each
    /// with what uses it), the bucket's objects, and multipart uploads never completed.
    List {
        #[arg(long)]
        json: bool,
        /// Another cloud's account (JSON, as `cloud account --json` prints) instead of the
        /// lab's cloud.
        #[arg(long)]
        account: Option<PathBuf>,
    },
    /// Terminate instances (their disks go with them).
    Terminate {
        #[arg(required = true)]
        instances: Vec<String>,
        /// Another cloud's account (JSON, as `cloud account --json` prints) instead of the
        /// lab's cloud.
        #[arg(long)]
        account: Option<PathBuf>,
    },
    /// Remove imported images (`DeregisterImage`; their instances terminated first).
    Deregister {
        #[arg(required = true)]
        images: Vec<String>,
        /// Another cloud's account (JSON, as `cloud account --json` prints) instead of the
        /// lab's cloud.
        #[arg(long)]
        account: Option<PathBuf>,
    },
    /// Delete objects of the account's bucket.
    Delete {
        #[arg(required = true)]
        keys: Vec<String>,
        /// Another cloud's account (JSON, as `cloud account --json` prints) instead of the
        /// lab's cloud.
        #[arg(long)]
        account: Option<PathBuf>,
    },
    /// Delete security groups (`sg-...`; no instance that runs may be in them).
    DeleteGroup {
        #[arg(required = true)]
        groups: Vec<String>,
        /// Another cloud's account (JSON, as `cloud account --json` prints) instead of the
        /// lab's cloud.
        #[arg(long)]
        account: Option<PathBuf>,
    },
    /// Abort multipart uploads never completed (their ids, from `cloud list`): their
    /// parts are freed.
    AbortUpload {
        #[arg(required = true)]
        upload_ids: Vec<String>,
        /// Another cloud's account (JSON, as `cloud account --json` prints) instead of the
        /// lab's cloud.
        #[arg(long)]
        account: Option<PathBuf>,
    },
    /// Runs the lab's cloud provider in the current namespace (started by `cloud up`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
}

fn spinner() -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("a template"));
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// The account in `file`, or the lab cloud's.
fn account_or_lab(lab: &Lab, file: Option<PathBuf>) -> anyhow::Result<dczone_cloud::Account> {
    match file {
        Some(f) => read_account(&f),
        None => cloud::lab_account(lab),
    }
}

fn read_account(f: &Path) -> anyhow::Result<dczone_cloud::Account> {
    let text =
        std::fs::read(f).with_context(|| format!("cannot read account file {}", f.display()))?;
    serde_json::from_slice(&text).with_context(|| {
        format!(
            "account file {} must be JSON with region, s3_endpoint, compute_endpoint, \
             access_key, secret_key and bucket (`dczone cloud account --json` prints one)",
            f.display()
        )
    })
}

fn print_account(a: &dczone_cloud::Account, json: bool) {
    if json {
        print_json(a);
        return;
    }
    let mut rows = vec![
        vec!["region".into(), a.region.clone()],
        vec!["object storage (S3) endpoint".into(), a.s3_endpoint.clone()],
        vec!["bucket".into(), a.bucket.clone()],
        vec!["access key".into(), a.access_key.clone()],
        vec!["secret key".into(), a.secret_key.clone()],
        vec![
            "compute API (EC2 2016-11-15) endpoint".into(),
            a.compute_endpoint.clone(),
        ],
    ];
    if let Some(at) = &a.expires {
        rows.push(vec!["key expires".into(), at.clone()]);
    }
    print!("{}", render(&["", "value"], &rows));
}

pub fn run(
    lab: &Lab,
    exe: &Path,
    state_dir: &Path,
    command: CloudCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        CloudCommand::Serve { config } => {
            let text = std::fs::read(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            dczone_cloud::provider::serve(serde_json::from_slice(&text)?)?;
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::Up { json } => {
            let pb = spinner();
            let a = cloud::lab_up(lab, exe, &|m| pb.set_message(m.to_string()))?;
            pb.finish_and_clear();
            print_account(&a, json);
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::Account { json } => {
            print_account(&cloud::lab_account(lab)?, json);
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::Key { expires_in, json } => {
            let account = cloud::lab_account(lab)?;
            let issued = cloud::from_client(lab, move || cloud::issue_key(&account, expires_in))??;
            print_account(&issued, json);
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::Migrate {
            vms,
            format,
            part_mib,
            streams,
            security_groups,
            stop_source,
            downtime_reference_ms,
            account,
            json,
        } => {
            // Bad input fails before the cloud is started or called.
            dczone_cloud::ec2::DiskFormat::parse(&format).with_context(|| {
                format!("unknown disk format '{format}': use vmdk, vhd, raw or qcow2")
            })?;
            let pb = spinner();
            let account = match account {
                Some(f) => read_account(&f)?,
                None => cloud::lab_up(lab, exe, &|m| pb.set_message(m.to_string()))?,
            };
            let agents = dczone_control::lab_agents(lab, exe, state_dir)?;
            // The operator's place: the zone's client host, from where the cloud's API is
            // called and the instance's application asked, as the VM's clients would.
            let p = pb.clone();
            let report = cloud::from_client(lab, move || {
                cloud::migrate(
                    &agents,
                    &account,
                    &vms,
                    &cloud::MigrateOptions {
                        format,
                        part_mib,
                        streams,
                        security_groups,
                        stop_source,
                        downtime_reference_ms,
                    },
                    &|ip| cloud::app_answers(ip, cloud::PROBE_TIMEOUT),
                    &|m| p.set_message(m.to_string()),
                )
            })?;
            pb.finish_and_clear();
            let report = report?;
            if let Some(f) = &json {
                std::fs::write(f, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("write {}", f.display()))?;
            }
            let rows: Vec<Vec<String>> = report
                .vms
                .iter()
                .map(|v| {
                    let p = &v.phases;
                    let mut row = vec![
                        v.vm.clone(),
                        v.instance.clone(),
                        v.ip.clone(),
                        v.format.clone(),
                        dczone_storage::size(v.object_bytes),
                    ];
                    row.extend(phase_cells(p));
                    row.extend([
                        format!("{:.1}", v.t1_ms / 1e3),
                        format!("{:.0}", v.transfer_mbit_s),
                    ]);
                    row
                })
                .collect();
            print!(
                "{}",
                render(
                    &[
                        "VM",
                        "instance",
                        "address",
                        "format",
                        "object",
                        "export ms",
                        "convert ms",
                        "transfer ms",
                        "import ms",
                        "settings ms",
                        "start ms",
                        "T1 s",
                        "Mbit/s",
                    ],
                    &rows
                )
            );
            if let (Some(reference), Some(within)) = (
                report.downtime_reference_ms,
                report.downtime_within_reference,
            ) {
                // A cold move: the sources were stopped on purpose.
                let downtimes: Vec<String> = report
                    .vms
                    .iter()
                    .map(|v| format!("{} {:.1} s", v.vm, v.downtime_ms.unwrap_or(f64::NAN) / 1e3))
                    .collect();
                println!(
                    "T1 of the batch: {:.1} s; transfer {:.0} Mbit/s; downtime (stop to the \
                     first answer in the cloud) {} against the reference {:.1} s: {}; the \
                     source VMs stay stopped",
                    report.t1_total_ms / 1e3,
                    report.transfer_mbit_s,
                    downtimes.join(", "),
                    reference / 1e3,
                    if within { "within" } else { "OVER" }
                );
                return Ok(if within {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            println!(
                "T1 of the batch: {:.1} s; transfer {:.0} Mbit/s; source VMs {}",
                report.t1_total_ms / 1e3,
                report.transfer_mbit_s,
                if report.source_running {
                    "still running"
                } else {
                    "NOT all running"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::List { json, account } => {
            let account = account_or_lab(lab, account)?;
            let inv = cloud::from_client(lab, move || inventory::inventory(&account))??;
            if json {
                print_json(&inv);
                return Ok(ExitCode::SUCCESS);
            }
            let used = |u: &[String]| {
                if u.is_empty() {
                    "-".to_string()
                } else {
                    u.join(" ")
                }
            };
            let rows: Vec<Vec<String>> = inv
                .instances
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        i.state.clone(),
                        i.ip.clone(),
                        i.instance_type.clone(),
                        i.image_id.clone(),
                        i.groups.join(" "),
                        i.launch_time.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render(
                    &["instance", "state", "address", "type", "image", "groups", "launched"],
                    &rows
                )
            );
            let rows: Vec<Vec<String>> = inv
                .images
                .iter()
                .map(|i| {
                    vec![
                        i.image.id.clone(),
                        i.image.state.clone(),
                        format!("{} GiB", i.image.size_gib),
                        used(&i.used_by),
                    ]
                })
                .collect();
            print!("{}", render(&["image", "state", "disk", "used by"], &rows));
            let rows: Vec<Vec<String>> = inv
                .groups
                .iter()
                .map(|g| {
                    vec![
                        g.group.id.clone(),
                        g.group.name.clone(),
                        g.group.rules.join(", "),
                        used(&g.used_by),
                    ]
                })
                .collect();
            print!(
                "{}",
                render(&["security group", "name", "ingress", "used by"], &rows)
            );
            let rows: Vec<Vec<String>> = inv
                .objects
                .iter()
                .map(|o| {
                    vec![
                        o.key.clone(),
                        dczone_storage::size(o.bytes),
                        o.last_modified.clone(),
                    ]
                })
                .collect();
            print!("{}", render(&["object", "size", "modified"], &rows));
            if !inv.uploads.is_empty() {
                let rows: Vec<Vec<String>> = inv
                    .uploads
                    .iter()
                    .map(|u| vec![u.upload_id.clone(), u.key.clone(), u.initiated.clone()])
                    .collect();
                print!(
                    "{}",
                    render(&["upload never completed", "object", "begun"], &rows)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::Terminate { instances, account } => {
            let account = account_or_lab(lab, account)?;
            let ids = instances.clone();
            cloud::from_client(lab, move || inventory::terminate(&account, &ids))??;
            println!("terminated: {}", instances.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::Deregister { images, account } => {
            let account = account_or_lab(lab, account)?;
            let ids = images.clone();
            cloud::from_client(lab, move || inventory::deregister(&account, &ids))??;
            println!("deregistered: {}", images.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::Delete { keys, account } => {
            let account = account_or_lab(lab, account)?;
            let ks = keys.clone();
            cloud::from_client(lab, move || inventory::delete_objects(&account, &ks))??;
            println!("deleted: {}", keys.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::DeleteGroup { groups, account } => {
            let account = account_or_lab(lab, account)?;
            let ids = groups.clone();
            cloud::from_client(lab, move || inventory::delete_groups(&account, &ids))??;
            println!("deleted: {}", groups.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::AbortUpload {
            upload_ids,
            account,
        } => {
            let account = account_or_lab(lab, account)?;
            let ids = upload_ids.clone();
            cloud::from_client(lab, move || inventory::abort_uploads(&account, &ids))??;
            println!("aborted: {}", upload_ids.join(", "));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A migration's phases as table cells, ms: export, convert, transfer, import, settings,
/// start.
pub(crate) fn phase_cells(p: &cloud::Phases) -> [String; 6] {
    [
        p.export_ms,
        p.convert_ms,
        p.transfer_ms,
        p.import_ms,
        p.settings_ms,
        p.start_ms,
    ]
    .map(|ms| format!("{ms:.0}"))
}
