//! ICMP echo with kernel receive timestamps, the way `ping` measures.
//!
//! The far host's kernel answers the echo in softirq context, so no application wake-up
//! on the far side is counted, and `SO_TIMESTAMPNS` gives the moment the reply reached the
//! near host's kernel, so our own wake-up is not counted either. What remains is the
//! network path: veth, bridge, the emulator and the configured delay.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A raw ICMP socket in the calling thread's namespace.
#[derive(Debug)]
pub struct Pinger {
    fd: OwnedFd,
    ident: u16,
}

fn realtime_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Pinger {
    /// Needs CAP_NET_RAW.
    pub fn new(ident: u16) -> io::Result<Pinger> {
        // SAFETY: plain socket(2) call; the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        // SAFETY: SO_TIMESTAMPNS takes an int; pointer and length describe `on`.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pinger { fd, ident })
    }

    /// Sends echo `seq` to `to` and waits up to `timeout` for its reply. Returns the RTT,
    /// or `None` if no reply came in time.
    pub fn ping(&self, to: Ipv4Addr, seq: u16, timeout: Duration) -> io::Result<Option<Duration>> {
        let mut pkt = [0u8; 64];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&self.ident.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(to).to_be(),
            },
            sin_zero: [0; 8],
        };
        let sent_at = realtime_ns();
        // SAFETY: buffer and address are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let deadline = sent_at + timeout.as_nanos() as i128;
        // Busy-poll for the reply: a sleeping prober leaves its vCPU idle, and waking an idle
        // vCPU of a nested VM delays the softirq that timestamps the reply.
        while realtime_ns() < deadline {
            if let Some((rx_at, reply_seq)) = self.recv()? {
                if reply_seq == seq {
                    return Ok(Some(Duration::from_nanos((rx_at - sent_at).max(0) as u64)));
                }
            }
            std::hint::spin_loop();
        }
        Ok(None)
    }

    /// Reads one datagram; returns its kernel timestamp and sequence if it is our reply.
    fn recv(&self) -> io::Result<Option<(i128, u16)>> {
        let mut buf = [0u8; 256];
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; zeroed is a valid "empty" value, filled in below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg points at live buffers of the lengths it states.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(err)
            };
        }
        let data = &buf[..n as usize];
        let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
        let Some(icmp) = data.get(ihl..ihl + 8) else {
            return Ok(None);
        };
        if icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != self.ident {
            return Ok(None);
        }
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
        let mut stamp = None;
        // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, bounded by
        // msg_controllen; SCM_TIMESTAMPNS carries a struct timespec.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
                {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    stamp = Some(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec));
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok(Some((stamp.unwrap_or_else(realtime_ns), seq)))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 section 3 example words sum to 0xddf2; the checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(super::checksum(&data), !0xddf2);
    }
}
