//! `dczone image build`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use dczone_image::{Image, ImageInputs};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the guest image (kernel + initramfs), or report the cached one.
    Build {
        #[arg(long)]
        json: bool,
    },
}

pub fn inputs(exe: &Path) -> ImageInputs {
    ImageInputs::for_executable(exe)
}

pub fn ensure(exe: &Path) -> anyhow::Result<Image> {
    Ok(dczone_image::ensure(&inputs(exe))?)
}

pub fn run(exe: &Path, cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Build { json } => {
            let img = ensure(exe)?;
            if json {
                crate::print_json(&json!({
                    "key": img.key,
                    "kernel": img.kernel,
                    "initramfs": img.initramfs,
                    "kernel_package": img.kernel_package,
                    "built": img.built,
                }));
            } else {
                println!(
                    "guest image {} ({}): {}\n  kernel    {}\n  initramfs {}",
                    img.key,
                    img.kernel_package,
                    if img.built {
                        "built"
                    } else {
                        "cached, inputs unchanged"
                    },
                    img.kernel.display(),
                    img.initramfs.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
