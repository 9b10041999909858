//! Frames as read from a TAP opened with `IFF_VNET_HDR`: a 10-byte `virtio_net_hdr`
//! followed by an Ethernet frame that may be a GSO super-frame of up to 64 KiB.
//!
//! The rate limiter charges *wire* bytes: what the super-frame would occupy on a real link
//! once segmented, including Ethernet preamble, FCS and inter-frame gap.

/// Length of `struct virtio_net_hdr` (the TAP default).
pub const VNET_HDR_LEN: usize = 10;
/// Preamble + SFD (8) + FCS (4) + inter-frame gap (12).
pub const ETH_WIRE_OVERHEAD: u64 = 24;
/// Minimum Ethernet frame without FCS.
pub const ETH_MIN_FRAME: u64 = 60;

const GSO_NONE: u8 = 0;
const GSO_ECN: u8 = 0x80;

/// Ethernet destination and source of a frame (after the vnet header).
pub fn macs(frame: &[u8]) -> Option<([u8; 6], [u8; 6])> {
    let eth = frame.get(VNET_HDR_LEN..VNET_HDR_LEN + 12)?;
    let mut dst = [0; 6];
    let mut src = [0; 6];
    dst.copy_from_slice(&eth[..6]);
    src.copy_from_slice(&eth[6..12]);
    Some((dst, src))
}

/// The IP protocol number and the offset of the L4 header of an Ethernet frame (IPv4 or
/// IPv6, optionally VLAN-tagged).
fn l4(l2: &[u8]) -> Option<(u8, usize)> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*l2.get(off)?, *l2.get(off + 1)?]);
    if ethertype == 0x8100 {
        off += 4;
        ethertype = u16::from_be_bytes([*l2.get(off)?, *l2.get(off + 1)?]);
    }
    let l3 = off + 2;
    match ethertype {
        0x0800 => Some((*l2.get(l3 + 9)?, l3 + usize::from(l2.get(l3)? & 0x0f) * 4)),
        0x86dd => Some((*l2.get(l3 + 6)?, l3 + 40)),
        _ => None,
    }
}

/// Bytes of Ethernet + IP + L4 headers of a frame, if it is TCP or UDP over IPv4/IPv6.
fn header_len(l2: &[u8]) -> Option<usize> {
    let (proto, l4) = l4(l2)?;
    match proto {
        6 => Some(l4 + usize::from(l2.get(l4 + 12)? >> 4) * 4),
        17 => Some(l4 + 8),
        _ => None,
    }
}

/// The TCP or UDP ports of an IPv4/IPv6 frame (after the vnet header): (source, destination).
pub fn l4_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let l2 = frame.get(VNET_HDR_LEN..)?;
    let (proto, at) = l4(l2)?;
    if proto != 6 && proto != 17 {
        return None;
    }
    let port = |at: usize| Some(u16::from_be_bytes([*l2.get(at)?, *l2.get(at + 1)?]));
    Some((port(at)?, port(at + 2)?))
}

/// Is this frame HA control traffic (to or from one of `ports`)? SPEC.md section 1: the HA
/// platform's traffic is small but goes before everything else.
pub fn is_priority(frame: &[u8], ports: &[u16]) -> bool {
    uses_port(frame, ports)
}

/// Is this frame TCP or UDP to or from one of `ports`?
pub fn uses_port(frame: &[u8], ports: &[u16]) -> bool {
    !ports.is_empty()
        && l4_ports(frame).is_some_and(|(s, d)| ports.contains(&s) || ports.contains(&d))
}

/// What a frame costs on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireCost {
    /// Bytes on the wire, including preamble, FCS and inter-frame gap of every segment.
    pub bytes: u64,
    /// Ethernet frames on the wire: 1, or `ceil(payload / gso_size)` for a super-frame.
    pub segments: u64,
}

/// Wire cost of a frame that starts with its vnet header.
pub fn wire_cost(frame: &[u8]) -> WireCost {
    let l2 = frame.get(VNET_HDR_LEN..).unwrap_or(&[]);
    let len = l2.len() as u64;
    let plain = WireCost {
        bytes: len.max(ETH_MIN_FRAME) + ETH_WIRE_OVERHEAD,
        segments: 1,
    };
    if frame.len() < VNET_HDR_LEN {
        return plain;
    }
    let gso_type = frame[1] & !GSO_ECN;
    let gso_size = u64::from(u16::from_le_bytes([frame[4], frame[5]]));
    if gso_type == GSO_NONE || gso_size == 0 {
        return plain;
    }
    let Some(hdrs) = header_len(l2).map(|h| h as u64).filter(|&h| h < len) else {
        return plain;
    };
    let payload = len - hdrs;
    let segments = payload.div_ceil(gso_size).max(1);
    WireCost {
        bytes: payload + segments * (hdrs + ETH_WIRE_OVERHEAD),
        segments,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A vnet header + Ethernet/IPv4/TCP frame with `payload` bytes, GSO if `mss` > 0.
    pub(crate) fn tcp_frame(payload: usize, mss: u16) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN + 14 + 20 + 32 + payload];
        if mss > 0 {
            f[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
            f[4..6].copy_from_slice(&mss.to_le_bytes());
        }
        let l2 = &mut f[VNET_HDR_LEN..];
        l2[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        l2[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        l2[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        l2[14] = 0x45;
        l2[14 + 9] = 6;
        l2[34 + 12] = 8 << 4; // 32-byte TCP header (timestamps)
        f
    }

    #[test]
    fn etcd_frames_are_priority() {
        let mut f = tcp_frame(100, 0);
        let tcp = VNET_HDR_LEN + 34;
        f[tcp..tcp + 2].copy_from_slice(&40000u16.to_be_bytes());
        f[tcp + 2..tcp + 4].copy_from_slice(&2380u16.to_be_bytes());
        assert_eq!(l4_ports(&f), Some((40000, 2380)));
        assert!(is_priority(&f, &[2379, 2380]));
        f[tcp + 2..tcp + 4].copy_from_slice(&5432u16.to_be_bytes());
        assert!(!is_priority(&f, &[2379, 2380]));
        assert!(!is_priority(&f, &[]));
    }

    #[test]
    fn plain_frame_pays_overhead_and_minimum() {
        assert_eq!(wire_cost(&tcp_frame(1434, 0)).bytes, 1500 + 24);
        assert_eq!(wire_cost(&tcp_frame(0, 0)).bytes, 66 + 24);
        let mut tiny = vec![0u8; VNET_HDR_LEN + 42];
        tiny[VNET_HDR_LEN + 12] = 0x08;
        tiny[VNET_HDR_LEN + 13] = 0x06;
        assert_eq!(wire_cost(&tiny).bytes, 60 + 24);
    }

    #[test]
    fn super_frame_is_charged_per_segment() {
        // 10 full segments of 1448 bytes and one of 520.
        let f = tcp_frame(10 * 1448 + 520, 1448);
        assert_eq!(
            wire_cost(&f),
            WireCost {
                bytes: (10 * 1448 + 520) + 11 * (66 + 24),
                segments: 11
            }
        );
        let (dst, src) = macs(&f).unwrap();
        assert_eq!(dst, [2, 0, 0, 0, 0, 2]);
        assert_eq!(src, [2, 0, 0, 0, 0, 1]);
    }
}
