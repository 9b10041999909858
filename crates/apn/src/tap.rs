//! TAP devices opened with a vnet header and TSO/checksum offloads, so the kernel hands us
//! (and accepts from us) 64 KiB GSO super-frames instead of 1500-byte frames.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_TSO_ECN: libc::c_ulong = 0x08;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (attaching to, or creating) TAP `name` in the calling thread's network namespace,
/// non-blocking, with a vnet header and offloads enabled.
pub fn open(name: &str) -> io::Result<File> {
    let cname = CString::new(name).map_err(|_| io::Error::other("TAP name contains NUL"))?;
    if cname.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("TAP name '{name}' is too long")));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(cname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its layout and size
    // (16-byte name, flags, padding to 40 bytes) and lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a TAP we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}
