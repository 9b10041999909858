//! `dczone image build`.

use std::path::{Path, PathBuf};
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

/// The static guest binary: `$DCZONE_GUEST_BIN`, else built by `scripts/build` under
/// `target/x86_64-unknown-linux-gnu/{release,debug}/` next to this executable's target dir.
pub fn guest_binary(exe: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("DCZONE_GUEST_BIN") {
        return PathBuf::from(p);
    }
    let target = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let candidates = ["release", "debug"].map(|p| {
        target
            .join("x86_64-unknown-linux-gnu")
            .join(p)
            .join("dczone-guest")
    });
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

pub fn inputs(exe: &Path) -> ImageInputs {
    ImageInputs {
        guest_binary: guest_binary(exe),
        busybox: PathBuf::from("/bin/busybox"),
        cache_root: std::env::var_os("DCZONE_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/dczone")),
    }
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
