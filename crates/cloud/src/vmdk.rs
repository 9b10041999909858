//! A writer of stream-optimized VMDK (VMware's "Virtual Disk Format 5.0", the format
//! EC2's `ImportImage` and vSphere take): one pass, front to back, so that an image is
//! sent while it is made. Each grain (64 KiB) that holds data is written compressed
//! (zlib) behind a grain marker; a grain table follows the grains it maps, and the grain
//! directory, the footer (a copy of the header that says where the directory is) and the
//! end-of-stream marker close the file. Grains of zeroes are not written.
//!
//! ```text
//! header (gd at end) | descriptor | grain... | GT marker, GT | ... | GD marker, GD |
//! footer marker, footer | end of stream
//! ```

use std::io::{self, Read, Write};

const SECTOR: u64 = 512;
/// Bytes of a grain.
pub const GRAIN: u64 = 64 << 10;
const GRAIN_SECTORS: u64 = GRAIN / SECTOR;
const GTES_PER_GT: u64 = 512;
const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR;
/// The grains start here (header, descriptor, padding to a grain).
const OVERHEAD_SECTORS: u64 = 128;
const DESCRIPTOR_SECTORS: u64 = 20;
const GD_AT_END: u64 = u64::MAX;

const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// Newline detection, compressed grains, markers.
const FLAGS: u32 = 1 | (1 << 16) | (1 << 17);

/// A grain compressed for the stream. A grain that does not shrink (random or encrypted
/// data) is stored: deflate's stored blocks, 16 bytes more than a 64 KiB grain, which
/// inflate as a copy. Left as level 1 made them 6 % larger and took the cloud 131 ms to inflate
/// per 64 MiB; stored, 71.3 MB of image became 67.2 MB.
///
/// Whether to try is decided on a sample first, as btrfs's compression heuristic does: a
/// grain whose sample (`SAMPLES` pieces of `SAMPLE` bytes spread over it) deflate does not
/// shrink is stored at once. Trying every random grain cost 399 ms of a core per 64 MiB,
/// the samples 23 ms: a core the source's host shares with the upload and the VM.
pub fn compress(raw: &[u8]) -> Vec<u8> {
    let deflate = |bytes: &[u8], level| {
        let mut e = flate2::write::ZlibEncoder::new(Vec::with_capacity(bytes.len() + 64), level);
        e.write_all(bytes).expect("writing to memory");
        e.finish().expect("writing to memory")
    };
    let stored = || deflate(raw, flate2::Compression::none());
    if raw.len() >= SAMPLES * SAMPLE * 2 {
        let step = raw.len() / SAMPLES;
        let sample: Vec<u8> = (0..SAMPLES)
            .flat_map(|k| &raw[k * step..k * step + SAMPLE])
            .copied()
            .collect();
        if deflate(&sample, flate2::Compression::fast()).len() >= sample.len() * 31 / 32 {
            return stored();
        }
    }
    let z = deflate(raw, flate2::Compression::fast());
    if z.len() < raw.len() {
        z
    } else {
        stored()
    }
}

/// The pieces of a grain deflated first to see whether it shrinks, and their size.
const SAMPLES: usize = 4;
const SAMPLE: usize = 1024;

/// A stream-optimized VMDK being written to `out`.
pub struct StreamOptimized<W: Write> {
    out: W,
    /// Bytes written (always whole sectors).
    at: u64,
    capacity: u64,
    /// Per grain table: the sector of its table, 0 for none.
    gd: Vec<u32>,
    /// The grain table being filled: its number and entries.
    gt: Option<(u64, Vec<u32>)>,
    next_grain: u64,
}

impl<W: Write> std::fmt::Debug for StreamOptimized<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOptimized")
            .field("at", &self.at)
            .field("capacity", &self.capacity)
            .field("next_grain", &self.next_grain)
            .finish()
    }
}

impl<W: Write> StreamOptimized<W> {
    /// Starts an image of `size` bytes (rounded up to a sector).
    pub fn new(mut out: W, size: u64) -> io::Result<Self> {
        let capacity = size.div_ceil(SECTOR);
        // Tables address sectors with 32 bits (QEMU's VMDK_EXTENT_MAX_SECTORS).
        if capacity > u64::from(u32::MAX) {
            return Err(io::Error::other(format!(
                "{size} bytes is too large for one VMDK extent (2 TiB at most)"
            )));
        }
        let gts = capacity.div_ceil(GRAIN_SECTORS * GTES_PER_GT) as usize;
        let mut head = vec![0u8; (OVERHEAD_SECTORS * SECTOR) as usize];
        head[..512].copy_from_slice(&header(capacity, GD_AT_END));
        let desc = descriptor(capacity);
        head[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
        out.write_all(&head)?;
        Ok(StreamOptimized {
            out,
            at: head.len() as u64,
            capacity,
            gd: vec![0; gts],
            gt: None,
            next_grain: 0,
        })
    }

    /// The sector being written: what tables point at.
    fn sector(&self) -> io::Result<u32> {
        u32::try_from(self.at / SECTOR).map_err(|_| {
            io::Error::other("the image passes 2 TiB: a VMDK's tables cannot point past it")
        })
    }

    /// Writes `bytes` and pads them to a sector.
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        let pad = (SECTOR - bytes.len() as u64 % SECTOR) % SECTOR;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.at += bytes.len() as u64 + pad;
        Ok(())
    }

    fn marker(&mut self, sectors: u64, kind: u32) -> io::Result<()> {
        let mut m = [0u8; SECTOR as usize];
        m[..8].copy_from_slice(&sectors.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        self.put(&m)
    }

    /// Writes grain number `grain` (its data compressed by [`compress`]); grains come in
    /// increasing order.
    pub fn grain(&mut self, grain: u64, compressed: &[u8]) -> io::Result<()> {
        if grain < self.next_grain || grain * GRAIN_SECTORS >= self.capacity {
            return Err(io::Error::other(format!(
                "grain {grain} out of order or past the disk's end"
            )));
        }
        self.next_grain = grain + 1;
        let table = grain / GTES_PER_GT;
        if self.gt.as_ref().is_some_and(|(t, _)| *t != table) {
            self.close_table()?;
        }
        let at = self.sector()?;
        let entries = &mut self
            .gt
            .get_or_insert_with(|| (table, vec![0u32; GTES_PER_GT as usize]))
            .1;
        entries[(grain % GTES_PER_GT) as usize] = at;
        let mut g = Vec::with_capacity(12 + compressed.len());
        g.extend_from_slice(&(grain * GRAIN_SECTORS).to_le_bytes());
        g.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        g.extend_from_slice(compressed);
        self.put(&g)
    }

    fn close_table(&mut self) -> io::Result<()> {
        let Some((table, entries)) = self.gt.take() else {
            return Ok(());
        };
        self.marker(GT_SECTORS, MARKER_GT)?;
        self.gd[table as usize] = self.sector()?;
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.put(&bytes)
    }

    /// Writes the grain directory, the footer and the end of the stream; the output and
    /// the image's bytes.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.close_table()?;
        let gd_bytes: Vec<u8> = self.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.marker((gd_bytes.len() as u64).div_ceil(SECTOR), MARKER_GD)?;
        let gd_at = u64::from(self.sector()?);
        self.put(&gd_bytes)?;
        self.marker(1, MARKER_FOOTER)?;
        self.put(&header(self.capacity, gd_at))?;
        // End of stream: a marker of zeroes.
        self.put(&[0u8; SECTOR as usize])?;
        self.out.flush()?;
        Ok((self.out, self.at))
    }
}

/// The sparse extent header (`SparseExtentHeader`, 512 bytes).
fn header(capacity: u64, gd_offset: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let mut at = 0;
    let mut put = |b: &[u8]| {
        h[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    };
    put(b"KDMV");
    put(&3u32.to_le_bytes());
    put(&FLAGS.to_le_bytes());
    put(&capacity.to_le_bytes());
    put(&GRAIN_SECTORS.to_le_bytes());
    put(&1u64.to_le_bytes()); // the descriptor's sector
    put(&DESCRIPTOR_SECTORS.to_le_bytes());
    put(&(GTES_PER_GT as u32).to_le_bytes());
    put(&0u64.to_le_bytes()); // no redundant grain directory
    put(&gd_offset.to_le_bytes());
    put(&OVERHEAD_SECTORS.to_le_bytes());
    put(&[0]); // clean
    put(b"\n \r\n");
    put(&1u16.to_le_bytes()); // deflate
    h
}

fn descriptor(capacity: u64) -> String {
    let cid = crate::sigv4::sha256_hex(&capacity.to_le_bytes())[..8].to_string();
    let cylinders = (capacity / (16 * 63)).clamp(1, 16383);
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid}\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\n# Extent description\n\
         RW {capacity} SPARSE \"disk.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"ide\"\n"
    )
}

/// A stream-optimized VMDK read front to back (any writer's: grains carry their place in
/// their markers), each grain inflated as it comes: an import that writes the disk while
/// the object still arrives.
pub struct StreamReader<R: Read> {
    r: R,
    grain_bytes: usize,
    ended: bool,
    /// The grains its tables in front name (qemu-img's layout), `None` with the tables at
    /// the end: such a stream may end without an end-of-stream marker, once every grain
    /// has come. qemu-img pads its last grain to a sector and writes no marker after it,
    /// the zeroes of a marker coming from a cluster left unfilled; a grain that does not
    /// compress fills its cluster, and its file ends with it.
    tables_first: Option<u64>,
    /// Grains read so far.
    grains: u64,
}

/// The most metadata in front of the grains taken (tables of a 2 TiB disk: 128 MiB).
const MAX_FRONT_BYTES: u64 = 256 << 20;

/// The allocated entries of the grain tables found in `front` (the file from sector 1 to
/// the grains), through the directory at sector `gd`.
fn grains_named(front: &[u8], gd: u64, tables: u64, per_table: u64) -> io::Result<u64> {
    let slice = |sector: u64, len: u64| -> io::Result<&[u8]> {
        let start = sector
            .checked_sub(1)
            .map(|s| s * SECTOR)
            .filter(|s| s + len <= front.len() as u64)
            .ok_or_else(|| {
                bad(format!(
                    "a table at sector {sector} lies outside the metadata"
                ))
            })?;
        Ok(&front[start as usize..(start + len) as usize])
    };
    let dir = slice(gd, tables * 4)?;
    let mut n = 0;
    for e in dir.chunks(4) {
        let gt = u64::from(le_u32(e, 0));
        if gt != 0 {
            n += slice(gt, per_table * 4)?
                .chunks(4)
                .filter(|x| le_u32(x, 0) != 0)
                .count() as u64;
        }
    }
    Ok(n)
}

impl<R: Read> std::fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("grain_bytes", &self.grain_bytes)
            .field("ended", &self.ended)
            .finish()
    }
}

/// Why a VMDK cannot be read as a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A VMDK, but not stream-optimized (its tables come first): read it whole.
    #[error("not a stream-optimized VMDK (no compressed grains with markers)")]
    NotStreamOptimized,
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the image ends early",
        ));
    }
    Ok(())
}

/// Fills `buf` from `r` as far as it goes; the bytes read (short only at the end).
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<R: Read> StreamReader<R> {
    /// Reads the header; the reader and the disk's size in bytes.
    pub fn open(mut r: R) -> Result<(Self, u64), ReadError> {
        let mut h = [0u8; SECTOR as usize];
        r.read_exact(&mut h)?;
        if &h[..4] != b"KDMV" {
            return Err(bad("not a VMDK (no KDMV magic)".into()).into());
        }
        let flags = le_u32(&h, 8);
        let compress = u16::from_le_bytes([h[77], h[78]]);
        if flags & (1 << 16) == 0 || flags & (1 << 17) == 0 || compress != 1 {
            return Err(ReadError::NotStreamOptimized);
        }
        let capacity = le_u64(&h, 12);
        let grain = le_u64(&h, 20);
        let overhead = le_u64(&h, 64);
        let gd = le_u64(&h, 56);
        if grain == 0 || grain > 0x20_0000 || overhead == 0 {
            return Err(bad(format!("grain {grain} sectors, data at sector {overhead}")).into());
        }
        let tables_first = if gd == GD_AT_END {
            skip(&mut r, (overhead - 1) * SECTOR)?;
            None
        } else {
            let front = (overhead - 1) * SECTOR;
            let per_table = u64::from(le_u32(&h, 44));
            if front > MAX_FRONT_BYTES || per_table == 0 {
                return Err(bad(format!(
                    "{front} bytes of metadata, {per_table} entries per grain table"
                ))
                .into());
            }
            let mut meta = vec![0u8; front as usize];
            r.read_exact(&mut meta)?;
            let tables = capacity.div_ceil(grain * per_table);
            Some(grains_named(&meta, gd, tables, per_table)?)
        };
        Ok((
            StreamReader {
                r,
                grain_bytes: (grain * SECTOR) as usize,
                ended: false,
                tables_first,
                grains: 0,
            },
            capacity * SECTOR,
        ))
    }

    /// The next grain: its offset in the disk and its data; `None` at the end of stream.
    pub fn next_grain(&mut self) -> io::Result<Option<(u64, Vec<u8>)>> {
        while !self.ended {
            let mut m = [0u8; 12];
            let n = read_full(&mut self.r, &mut m)?;
            if n == 0 {
                if let Some(named) = self.tables_first {
                    if self.grains != named {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "the stream ends after {} of the {named} grains its tables name",
                                self.grains
                            ),
                        ));
                    }
                    self.ended = true;
                    break;
                }
            }
            if n < m.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ends before its end-of-stream marker",
                ));
            }
            let (val, size) = (le_u64(&m, 0), le_u32(&m, 8) as usize);
            if size > 0 {
                let mut z = vec![0u8; size];
                self.r.read_exact(&mut z)?;
                skip(&mut self.r, (SECTOR - (12 + size as u64) % SECTOR) % SECTOR)?;
                let mut data = Vec::with_capacity(self.grain_bytes);
                io::Read::read_to_end(
                    &mut flate2::read::ZlibDecoder::new(&z[..]).take(self.grain_bytes as u64 + 1),
                    &mut data,
                )
                .map_err(|e| bad(format!("grain at sector {val}: {e}")))?;
                if data.len() > self.grain_bytes {
                    return Err(bad(format!("grain at sector {val} inflates past a grain")));
                }
                self.grains += 1;
                return Ok(Some((val * SECTOR, data)));
            }
            let mut rest = [0u8; SECTOR as usize - 12];
            self.r.read_exact(&mut rest)?;
            match le_u32(&rest, 0) {
                0 => self.ended = true,
                // A grain table, the directory, the footer: what follows is skipped.
                1..=3 => skip(&mut self.r, val * SECTOR)?,
                t => return Err(bad(format!("unknown marker type {t}"))),
            }
        }
        Ok(None)
    }
}

/// `len` bytes that do not compress (xorshift), for tests.
#[cfg(test)]
pub(crate) fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate(z: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(z)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn a_grain_that_does_not_shrink_is_stored_and_one_that_does_is_compressed() {
        let noise = noise((GRAIN_SECTORS * SECTOR) as usize);
        let z = compress(&noise);
        // zlib's header and checksum, two stored blocks' headers (65535 bytes at most each).
        assert_eq!(z.len(), noise.len() + 16);
        assert!(inflate(&z) == noise);
        let text = b"a grain of a ledger ".repeat(3000);
        let z = compress(&text);
        assert!(z.len() < text.len() / 10, "{} bytes", z.len());
        assert!(inflate(&z) == text);
        // Half zeroes, half noise: its sample shrinks, so the grain is compressed.
        let mut half = vec![0u8; noise.len() / 2];
        half.extend_from_slice(&noise[..noise.len() / 2]);
        let z = compress(&half);
        assert!(z.len() < half.len() * 6 / 10, "{} bytes", z.len());
        assert!(inflate(&z) == half);
    }
}
