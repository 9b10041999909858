//! The guest image: Debian's cloud kernel (fetched with `apt-get download`), and an
//! uncompressed initramfs holding busybox, the virtio-net and virtio-blk modules in dependency order, and
//! `dczone-guest` run as init's service.
//!
//! Images are cached under `<cache>/images/<key>/`, where the key hashes every input
//! (kernel package, busybox, the guest binary, the init script, this builder's version), so
//! a rebuild happens only when an input changes.
//!
//! Kernel command line parameters read by `/init`: `dczone.ip=A.B.C.D/NN` (eth0 address);
//! `dczone.dirty_mbps`, `dczone.dirty_mib` and `dczone.resident_mib` are read by `dczone-guest`.

mod cpio;
pub mod modules;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the image layout changes.
const BUILDER_VERSION: u32 = 2;
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// What the guest needs for virtio-net-pci and virtio-blk-pci (a VM's disk).
const WANTED_MODULES: [&str; 3] = ["virtio_pci", "virtio_net", "virtio_blk"];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "init: insmod $m failed"; done
ip link set lo up
# The address first, then the link: its coming up announces the address (gratuitous ARP),
# so that a peer that asked for it while the VM booted learns it now, not at its next
# ARP retry (up to 1 s later).
echo 1 > /proc/sys/net/ipv4/conf/all/arp_notify
IP=$(sed -n 's/.*dczone\.ip=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$IP" ] && ip addr add "$IP" dev eth0
ip link set eth0 up
echo "init: eth0 $IP up"
while true; do /bin/dczone-guest; echo "init: dczone-guest exited, restarting"; sleep 1; done
"#;

/// Why the image could not be built; each names the step.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("guest binary {} not found; build it with `scripts/build` (a static `dczone-guest`)", .0.display())]
    NoGuestBinary(PathBuf),
    #[error("busybox {} not found; install the Debian package busybox-static", .0.display())]
    NoBusybox(PathBuf),
    #[error("{step} failed: `{command}`: {stderr}")]
    Command {
        step: &'static str,
        command: String,
        stderr: String,
    },
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel package {package} is unusable: {reason}")]
    Kernel { package: String, reason: String },
}

/// Where the inputs are.
#[derive(Debug, Clone)]
pub struct ImageInputs {
    pub guest_binary: PathBuf,
    pub busybox: PathBuf,
    pub cache_root: PathBuf,
}

/// An ELF executable without a program interpreter (no glibc `ld-linux` or musl `ld-musl`
/// named in its first page, where the `.interp` section of a dynamic one sits).
fn is_static_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4096];
    let Ok(n) = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)) else {
        return false;
    };
    let head = &head[..n];
    head.starts_with(b"\x7fELF") && !head.windows(7).any(|w| w == b"ld-linu" || w == b"ld-musl")
}

impl ImageInputs {
    /// The defaults for a `dczone`/`dczoned` executable at `exe`: the static guest binary
    /// from `$DCZONE_GUEST_BIN`, else as built by `scripts/build` under
    /// `target/x86_64-unknown-linux-gnu/{release,debug}/`, else a static one installed
    /// beside the executable (a real host: `/usr/local/bin/dczone-guest`); busybox from busybox-static; the
    /// cache in `$DCZONE_CACHE_DIR` or `/var/cache/dczone`.
    pub fn for_executable(exe: &Path) -> ImageInputs {
        let guest_binary = match std::env::var_os("DCZONE_GUEST_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                // Installed: beside the executable (e.g. /usr/local/bin on a real host);
                // in a build tree: the static build of `scripts/build`.
                let beside = exe.with_file_name("dczone-guest");
                let target = exe
                    .parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("."));
                let built = ["release", "debug"].map(|p| {
                    target
                        .join("x86_64-unknown-linux-gnu")
                        .join(p)
                        .join("dczone-guest")
                });
                // A build tree also holds a dynamically linked `dczone-guest` beside
                // `dczone` (any workspace build makes one); the guest has no libc for it.
                built
                    .iter()
                    .find(|p| p.exists())
                    .cloned()
                    .or_else(|| Some(beside).filter(|p| is_static_elf(p)))
                    .unwrap_or_else(|| built[0].clone())
            }
        };
        ImageInputs {
            guest_binary,
            busybox: PathBuf::from("/bin/busybox"),
            cache_root: std::env::var_os("DCZONE_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/dczone")),
        }
    }
}

/// A built image.
#[derive(Debug, Clone)]
pub struct Image {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub key: String,
    pub kernel_package: String,
    /// False if it came from the cache.
    pub built: bool,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

fn run(step: &'static str, cmd: &mut Command) -> Result<String, ImageError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| ImageError::Command {
        step,
        command: command.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            step,
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// FNV-1a, stable across builds (the cache key must not change with the compiler).
fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

/// The concrete kernel package the meta-package points at, remembered in `cache_root` for
/// as long as apt's package lists are unchanged: `apt-cache depends` takes half a second
/// of a core, and every command that opens the platform asks.
fn kernel_package_cached(cache_root: &Path) -> Result<String, ImageError> {
    let lists = std::fs::metadata("/var/lib/apt/lists")
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| format!("{KERNEL_META_PACKAGE} lists@{}", d.as_nanos()));
    let file = cache_root.join("kernel-package");
    if let (Some(key), Ok(text)) = (&lists, std::fs::read_to_string(&file)) {
        if let Some((k, package)) = text.trim().split_once('\n') {
            if k == key && !package.is_empty() {
                return Ok(package.to_string());
            }
        }
    }
    let package = kernel_package()?;
    if let Some(key) = lists {
        // Written whole or not at all: a reader never sees half.
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(cache_root).is_ok()
            && std::fs::write(&tmp, format!("{key}\n{package}\n")).is_ok()
        {
            let _ = std::fs::rename(&tmp, &file);
        }
    }
    Ok(package)
}

/// The concrete kernel package the meta-package points at.
fn kernel_package() -> Result<String, ImageError> {
    let out = run(
        "find the cloud kernel package",
        Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
    )?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| ImageError::Kernel {
            package: KERNEL_META_PACKAGE.into(),
            reason: "apt-cache names no linux-image dependency (run apt-get update)".into(),
        })
}

/// Downloads and unpacks the kernel package once; returns its unpacked root.
fn fetch_kernel(cache_root: &Path, package: &str) -> Result<PathBuf, ImageError> {
    let dir = cache_root.join("kernel").join(package);
    let root = dir.join("root");
    if root.join("boot").exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let tmp = dir.join("root.tmp");
    // One attempt: a fresh download (a partial .deb of an interrupted attempt is removed
    // first), then the unpack, which also catches a truncated archive.
    let attempt = || -> Result<(), ImageError> {
        for e in std::fs::read_dir(&dir)
            .map_err(io("list the kernel download"))?
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        run(
            "download the kernel",
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(&dir),
        )?;
        let deb = std::fs::read_dir(&dir)
            .map_err(io("list the kernel download"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| ImageError::Kernel {
                package: package.into(),
                reason: "apt-get download produced no .deb".into(),
            })?;
        let _ = std::fs::remove_dir_all(&tmp);
        run(
            "unpack the kernel",
            Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp),
        )
        .map(|_| ())
    };
    // A stale package index or a passing network failure (CI saw "Temporary failure
    // resolving 'deb.debian.org'" for a minute): refresh the index and retry, backing off.
    let mut tries = 0;
    while let Err(e) = attempt() {
        tries += 1;
        if tries == 5 {
            return Err(e);
        }
        let _ = run(
            "apt-get update",
            Command::new("apt-get").args(["update", "-q"]),
        );
        std::thread::sleep(std::time::Duration::from_secs(2 << tries));
    }
    std::fs::rename(&tmp, &root).map_err(io("move the unpacked kernel"))?;
    Ok(root)
}

fn find_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                find_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

/// Returns the cached image for these inputs, building it if needed.
pub fn ensure(inputs: &ImageInputs) -> Result<Image, ImageError> {
    let guest = std::fs::read(&inputs.guest_binary)
        .map_err(|_| ImageError::NoGuestBinary(inputs.guest_binary.clone()))?;
    let busybox = std::fs::read(&inputs.busybox)
        .map_err(|_| ImageError::NoBusybox(inputs.busybox.clone()))?;
    let package = kernel_package_cached(&inputs.cache_root).or_else(|e| {
        // Offline: fall back to a kernel already in the cache.
        std::fs::read_dir(inputs.cache_root.join("kernel"))
            .ok()
            .and_then(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .max()
            })
            .ok_or(e)
    })?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        &guest[..],
        &busybox[..],
        INIT.as_bytes(),
        package.as_bytes(),
        &BUILDER_VERSION.to_le_bytes(),
    ] {
        fnv(&mut h, &(part.len() as u64).to_le_bytes());
        fnv(&mut h, part);
    }
    let key = format!("{h:016x}");
    let dir = inputs.cache_root.join("images").join(&key);
    let kernel = dir.join("vmlinuz");
    let initramfs = dir.join("initramfs.cpio");
    if kernel.exists() && initramfs.exists() {
        return Ok(Image {
            kernel,
            initramfs,
            key,
            kernel_package: package,
            built: false,
        });
    }
    let root = fetch_kernel(&inputs.cache_root, &package)?;
    let mut files = Vec::new();
    find_files(&root, &mut files);
    let vmlinuz = files
        .iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ImageError::Kernel {
            package: package.clone(),
            reason: "no boot/vmlinuz-*".into(),
        })?;
    let mut kos: HashMap<String, PathBuf> = HashMap::new();
    for p in &files {
        if let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            kos.insert(name.replace('-', "_"), p.clone());
        }
    }
    let mut deps = HashMap::new();
    for (name, path) in &kos {
        let bytes = std::fs::read(path).map_err(io(format!("read {}", path.display())))?;
        deps.insert(name.clone(), modules::depends(&bytes));
    }
    let order =
        modules::load_order(&WANTED_MODULES, &deps).map_err(|reason| ImageError::Kernel {
            package: package.clone(),
            reason,
        })?;

    let mut c = cpio::Cpio::default();
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "lib",
        "lib/modules",
    ] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.char_dev("dev/null", 1, 3);
    c.file("init", 0o755, INIT.as_bytes());
    c.file("bin/busybox", 0o755, &busybox);
    c.file("bin/dczone-guest", 0o755, &guest);
    for m in &order {
        let bytes = std::fs::read(&kos[m]).map_err(io(format!("read module {m}")))?;
        c.file(&format!("lib/modules/{m}.ko"), 0o644, &bytes);
    }
    c.file("lib/modules/order", 0o644, order.join("\n").as_bytes());

    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    std::fs::copy(vmlinuz, tmp.join("vmlinuz")).map_err(io("copy the kernel"))?;
    std::fs::write(tmp.join("initramfs.cpio"), c.finish()).map_err(io("write the initramfs"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io(format!("publish {}", dir.display())))?;
    Ok(Image {
        kernel,
        initramfs,
        key,
        kernel_package: package,
        built: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_package_is_remembered_while_apt_lists_are_unchanged() {
        let dir = std::env::temp_dir().join(format!("dczone-kpkg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kernel-package");
        let Ok(lists) = std::fs::metadata("/var/lib/apt/lists").and_then(|m| m.modified()) else {
            return; // not a Debian host: nothing is remembered
        };
        let nanos = lists
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        // An answer under the lists' current key is taken as it is.
        let key = format!("{KERNEL_META_PACKAGE} lists@{nanos}");
        std::fs::write(&file, format!("{key}\nlinux-image-remembered\n")).unwrap();
        assert_eq!(
            kernel_package_cached(&dir).unwrap(),
            "linux-image-remembered"
        );
        // Under another key (the lists changed), apt-cache is asked again and its answer
        // kept.
        std::fs::write(&file, "other lists@1\nlinux-image-stale\n").unwrap();
        if let Ok(asked) = kernel_package_cached(&dir) {
            assert!(asked.starts_with("linux-image-") && asked != "linux-image-stale");
            let kept = std::fs::read_to_string(&file).unwrap();
            assert_eq!(kept, format!("{key}\n{asked}\n"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_statically_linked_guest_is_taken_from_beside_the_executable() {
        // busybox-static (scripts/deps) is linked statically, coreutils' ls is not.
        assert!(is_static_elf(Path::new("/bin/busybox")));
        assert!(!is_static_elf(Path::new("/bin/ls")));
        assert!(!is_static_elf(Path::new("/nonexistent")));
        let dir = std::env::temp_dir().join(format!("dczone-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy("/bin/ls", dir.join("dczone-guest")).unwrap();
        let inputs = ImageInputs::for_executable(&dir.join("dczoned"));
        assert_ne!(
            inputs.guest_binary,
            dir.join("dczone-guest"),
            "a dynamic guest taken"
        );
        std::fs::copy("/bin/busybox", dir.join("dczone-guest")).unwrap();
        let inputs = ImageInputs::for_executable(&dir.join("dczoned"));
        assert_eq!(inputs.guest_binary, dir.join("dczone-guest"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
