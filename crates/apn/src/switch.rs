//! MAC learning: the emulator is one L2 switch with a port per site. Frames to a learned
//! unicast MAC go to that port; broadcast, multicast and unknown destinations flood to
//! every other port. A MAC seen on a new port moves at once, which is how a migrated VM's
//! announce (RARP/GARP from QEMU) redirects traffic.

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct MacTable {
    ports: HashMap<[u8; 6], usize>,
}

/// Where a frame goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    Port(usize),
    /// To every port except the ingress one.
    Flood,
    /// The destination is on the ingress port: the site's own bridge already delivered it.
    Drop,
}

impl MacTable {
    /// Learns `src` on `ingress` and decides where a frame to `dst` goes.
    pub fn forward(&mut self, ingress: usize, dst: [u8; 6], src: [u8; 6]) -> Forward {
        if src[0] & 1 == 0 {
            self.ports.insert(src, ingress);
        }
        if dst[0] & 1 == 1 {
            return Forward::Flood;
        }
        match self.ports.get(&dst) {
            Some(&p) if p == ingress => Forward::Drop,
            Some(&p) => Forward::Port(p),
            None => Forward::Flood,
        }
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const BCAST: [u8; 6] = [0xff; 6];

    #[test]
    fn learns_floods_and_moves() {
        let mut t = MacTable::default();
        assert_eq!(t.forward(0, BCAST, A), Forward::Flood);
        assert_eq!(t.forward(1, A, B), Forward::Port(0));
        assert_eq!(t.forward(0, B, A), Forward::Port(1));
        assert_eq!(t.forward(1, B, [2, 0, 0, 0, 0, 0xc]), Forward::Drop);
        // A migrates to port 2 and announces itself.
        assert_eq!(t.forward(2, BCAST, A), Forward::Flood);
        assert_eq!(t.forward(1, A, B), Forward::Port(2));
        assert_eq!(t.len(), 3);
    }
}
