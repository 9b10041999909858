//! A disk image made in one pass while it is sent: the disk's data, given in order of
//! offset (holes read as zeroes), encoded as a cloud's format, and cut into the parts of a
//! multipart upload as it comes. Stream-optimized VMDK and raw can be written front to
//! back; VHD and QCOW2 put tables before the data they map, so they are converted whole
//! first (`qemu-img convert`).
//!
//! ```text
//! data in order ─▶ Encoder ─(VMDK: grains compressed on `threads` threads, written in
//!                            order)─▶ PartWriter ─parts─▶ Store::upload_stream
//! ```

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::ec2::DiskFormat;
use crate::s3::S3Error;
use crate::vmdk::{self, StreamOptimized, GRAIN};

/// Whether `format` is made in one pass while it is sent.
pub fn streams(format: DiskFormat) -> bool {
    matches!(format, DiskFormat::Vmdk | DiskFormat::Raw)
}

/// What writing a part says once the upload stopped taking them.
pub const UPLOAD_STOPPED: &str = "the upload stopped";

/// Grains compressed per job (1 MiB): small, so that the image trails its data by little.
const BATCH: usize = 16;

type Grains = Vec<(u64, Vec<u8>)>;

static ZERO_GRAIN: [u8; GRAIN as usize] = [0; GRAIN as usize];

/// Whether `b` holds only zeroes: compared with zeroes a grain at a time (memcmp), fast in
/// a debug build too.
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(GRAIN as usize)
        .all(|c| c == &ZERO_GRAIN[..c.len()])
}

/// An image being encoded into `W`.
pub struct Encoder<W: Write + Send + 'static> {
    size: u64,
    /// The end of the data given so far.
    end: u64,
    kind: Kind<W>,
}

enum Kind<W: Write + Send + 'static> {
    Raw(W),
    /// Grains are compressed on worker threads and written, in order, by a writer thread
    /// as soon as each is next.
    Vmdk {
        grains: Batcher,
        workers: Vec<std::thread::JoinHandle<()>>,
        /// Taken when it has stopped early, for its error.
        writer: Option<std::thread::JoinHandle<io::Result<(W, u64, u64)>>>,
    },
}

/// The grain being filled, and the batches of full ones sent to be compressed.
struct Batcher {
    cur: Option<(u64, Vec<u8>)>,
    batch: Grains,
    jobs: SyncSender<(u64, Grains)>,
    sent: u64,
}

impl Batcher {
    /// Copies `bytes` into grain `g` at `within` (grains only grow), sending the grain on
    /// once it is full.
    fn fill(&mut self, g: u64, within: usize, bytes: &[u8]) -> io::Result<()> {
        if self.cur.as_ref().is_none_or(|(c, _)| *c != g) {
            self.close_grain()?;
            self.cur = Some((g, vec![0u8; GRAIN as usize]));
        }
        let (_, buf) = self.cur.as_mut().expect("a grain being filled");
        buf[within..within + bytes.len()].copy_from_slice(bytes);
        if within + bytes.len() == GRAIN as usize {
            self.close_grain()?;
        }
        Ok(())
    }

    /// Adds the grain being filled to the batch (unless it is all zeroes).
    fn close_grain(&mut self) -> io::Result<()> {
        if let Some((g, buf)) = self.cur.take() {
            if !is_zero(&buf) {
                self.batch.push((g, buf));
            }
        }
        if self.batch.len() >= BATCH {
            self.send_batch()?;
        }
        Ok(())
    }

    fn send_batch(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let job = (self.sent, std::mem::take(&mut self.batch));
        self.sent += 1;
        self.jobs
            .send(job)
            .map_err(|_| io::Error::other("the image's writer stopped"))
    }
}

impl<W: Write + Send + 'static> std::fmt::Debug for Encoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.kind {
            Kind::Raw { .. } => "raw",
            Kind::Vmdk { .. } => "vmdk",
        };
        f.debug_struct("Encoder")
            .field("format", &format)
            .field("size", &self.size)
            .finish()
    }
}

/// Writes the compressed batches in their order as they come; ends when every worker has.
/// The output, the image's bytes and the batches written.
fn write_in_order<W: Write>(
    mut writer: StreamOptimized<W>,
    results: Receiver<(u64, Grains)>,
) -> io::Result<(W, u64, u64)> {
    let mut ready: BTreeMap<u64, Grains> = BTreeMap::new();
    let mut next = 0u64;
    for (seq, grains) in results {
        ready.insert(seq, grains);
        while let Some(grains) = ready.remove(&next) {
            for (g, z) in grains {
                writer.grain(g, &z)?;
            }
            next += 1;
        }
    }
    if !ready.is_empty() {
        return Err(io::Error::other("a compression thread stopped"));
    }
    let (w, bytes) = writer.finish()?;
    Ok((w, bytes, next))
}

impl<W: Write + Send + 'static> Encoder<W> {
    /// An image of a disk of `size` bytes in `format` (one that [`streams`]), written to
    /// `out`; VMDK's grains are compressed on `threads` threads.
    pub fn new(format: DiskFormat, size: u64, out: W, threads: usize) -> io::Result<Self> {
        let kind = match format {
            DiskFormat::Raw => Kind::Raw(out),
            DiskFormat::Vmdk => {
                let threads = threads.max(1);
                let (jobs, job_rx) = mpsc::sync_channel::<(u64, Grains)>(threads);
                // Bounded both ways: a slow upload holds the writer, the writer the
                // workers, the workers the encoder; at most a few batches are held.
                let (done_tx, results) = mpsc::sync_channel(threads);
                let job_rx = Arc::new(Mutex::new(job_rx));
                let workers = (0..threads)
                    .map(|_| {
                        let (rx, tx) = (job_rx.clone(), done_tx.clone());
                        std::thread::spawn(move || loop {
                            let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                            let Ok((seq, grains)) = job else { return };
                            let out: Grains = grains
                                .into_iter()
                                .map(|(g, raw)| (g, vmdk::compress(&raw)))
                                .collect();
                            if tx.send((seq, out)).is_err() {
                                return;
                            }
                        })
                    })
                    .collect();
                drop(done_tx);
                let stream = StreamOptimized::new(out, size)?;
                Kind::Vmdk {
                    grains: Batcher {
                        cur: None,
                        batch: Vec::with_capacity(BATCH),
                        jobs,
                        sent: 0,
                    },
                    workers,
                    writer: Some(std::thread::spawn(move || write_in_order(stream, results))),
                }
            }
            f => {
                return Err(io::Error::other(format!(
                    "{} is not written in one pass",
                    f.name()
                )))
            }
        };
        Ok(Encoder { size, end: 0, kind })
    }

    /// The disk's bytes at `offset`; offsets only grow.
    pub fn data(&mut self, mut offset: u64, mut bytes: &[u8]) -> io::Result<()> {
        if offset + bytes.len() as u64 > self.size {
            return Err(io::Error::other(format!(
                "data at {offset}..{} past the disk's {} bytes",
                offset + bytes.len() as u64,
                self.size
            )));
        }
        if offset < self.end {
            return Err(out_of_order(offset, self.end));
        }
        let gap = offset - self.end;
        self.end = offset + bytes.len() as u64;
        match &mut self.kind {
            Kind::Raw(out) => {
                zeroes(out, gap)?;
                out.write_all(bytes)
            }
            Kind::Vmdk { grains, writer, .. } => {
                while !bytes.is_empty() {
                    let within = (offset % GRAIN) as usize;
                    let k = bytes.len().min(GRAIN as usize - within);
                    if let Err(e) = grains.fill(offset / GRAIN, within, &bytes[..k]) {
                        // The writer stopped first (its output failed: the upload stopped):
                        // its error is the cause.
                        return Err(match writer.take().map(|w| w.join()) {
                            Some(Ok(Err(cause))) => cause,
                            _ => e,
                        });
                    }
                    offset += k as u64;
                    bytes = &bytes[k..];
                }
                Ok(())
            }
        }
    }

    /// Ends the image (raw: zeroes to the disk's size); the output and the image's bytes.
    pub fn finish(self) -> io::Result<(W, u64)> {
        match self.kind {
            Kind::Raw(mut out) => {
                zeroes(&mut out, self.size - self.end)?;
                out.flush()?;
                Ok((out, self.size))
            }
            Kind::Vmdk {
                mut grains,
                workers,
                writer,
            } => {
                grains.close_grain()?;
                grains.send_batch()?;
                let sent = grains.sent;
                // The jobs' end: the workers finish, then the writer.
                drop(grains);
                let mut lost = false;
                for w in workers {
                    lost |= w.join().is_err();
                }
                let (out, bytes, written) = writer
                    .ok_or_else(|| io::Error::other("the image's writer stopped"))?
                    .join()
                    .map_err(|_| io::Error::other("the image's writer panicked"))??;
                // Every batch sent must be in the image (a worker that died with the last
                // one leaves no gap to notice): else the output is dropped unfinished.
                if lost || written != sent {
                    return Err(io::Error::other(format!(
                        "a compression thread stopped: {written} of {sent} batches written"
                    )));
                }
                Ok((out, bytes))
            }
        }
    }
}

fn out_of_order(offset: u64, at: u64) -> io::Error {
    io::Error::other(format!(
        "data at {offset} after data at {at}: a disk's data must come in order"
    ))
}

fn zeroes(out: &mut impl Write, mut n: u64) -> io::Result<()> {
    let z = vec![0u8; 1 << 20];
    while n > 0 {
        let k = n.min(z.len() as u64) as usize;
        out.write_all(&z[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// The parts of an upload, cut from what is written: each `part_bytes` long, the last
/// sent by [`PartWriter::finish`]. Dropped unfinished (the image failed), it sends an
/// error, so that the upload is aborted rather than completed short.
#[derive(Debug)]
pub struct PartWriter {
    tx: Option<SyncSender<Result<Vec<u8>, S3Error>>>,
    buf: Vec<u8>,
    part_bytes: usize,
    sent: u64,
}

/// A writer of parts, and the source [`crate::s3::Store::upload_stream`] takes them from.
/// `in_flight` parts wait at most, made but not yet taken.
pub fn parts(part_bytes: u64, in_flight: usize) -> (PartWriter, PartSource) {
    let (tx, rx) = mpsc::sync_channel(in_flight.max(1));
    (
        PartWriter {
            tx: Some(tx),
            buf: Vec::with_capacity(part_bytes as usize),
            part_bytes: part_bytes as usize,
            sent: 0,
        },
        PartSource(Mutex::new(rx)),
    )
}

/// The receiving end of [`parts`].
#[derive(Debug)]
pub struct PartSource(Mutex<Receiver<Result<Vec<u8>, S3Error>>>);

impl PartSource {
    /// The next part, `None` once the writer finished.
    pub fn next(&self) -> Option<Result<Vec<u8>, S3Error>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).recv().ok()
    }
}

impl PartWriter {
    fn send(&mut self, part: Result<Vec<u8>, S3Error>) -> io::Result<()> {
        self.sent += 1;
        self.tx
            .as_ref()
            .expect("open until finished")
            .send(part)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, UPLOAD_STOPPED))
    }

    /// Sends the last part (none if it would be empty after others: an empty stream is
    /// one empty part).
    pub fn finish(mut self) -> io::Result<()> {
        let last = std::mem::take(&mut self.buf);
        if !last.is_empty() || self.sent == 0 {
            self.send(Ok(last))?;
        }
        self.tx = None;
        Ok(())
    }
}

impl Write for PartWriter {
    fn write(&mut self, mut b: &[u8]) -> io::Result<usize> {
        let n = b.len();
        while !b.is_empty() {
            let k = b.len().min(self.part_bytes - self.buf.len());
            self.buf.extend_from_slice(&b[..k]);
            b = &b[k..];
            if self.buf.len() == self.part_bytes {
                let part = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_bytes));
                self.send(Ok(part))?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            // Waits for room: the error must come before the channel's end, which would
            // read as the stream's end. A receiver gone fails it at once.
            let _ = tx.send(Err(S3Error::Other {
                what: "the image's stream".into(),
                reason: "it stopped before its end: the upload is aborted".into(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk with data in its first grain (partly), across a grain boundary, one grain
    /// of zeroes written, a grain far in, and a grain that does not compress (stored): as
    /// extents in order.
    fn extents() -> Vec<(u64, Vec<u8>)> {
        let noise = vmdk::noise(GRAIN as usize);
        let pattern = |n: usize, seed: u8| -> Vec<u8> {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        vec![
            (4096, pattern(8192, 1)),
            (GRAIN - 512, pattern(1024, 2)),
            (3 * GRAIN, vec![0u8; GRAIN as usize]),
            (600 * GRAIN + 512, pattern(GRAIN as usize, 3)),
            (700 * GRAIN, noise),
        ]
    }

    const SIZE: u64 = 1000 * GRAIN;

    fn qemu_img(args: &[&str]) -> std::process::Output {
        std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs (scripts/deps installs qemu-utils)")
    }

    fn encode(format: DiskFormat) -> (Vec<u8>, Vec<u8>) {
        let mut raw = vec![0u8; SIZE as usize];
        let mut e = Encoder::new(format, SIZE, Vec::new(), 2).unwrap();
        for (off, bytes) in extents() {
            raw[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
            // Fed in uneven pieces, as a pipe gives them.
            for (i, piece) in bytes.chunks(3000).enumerate() {
                e.data(off + i as u64 * 3000, piece).unwrap();
            }
        }
        let (out, n) = e.finish().unwrap();
        assert_eq!(n, out.len() as u64);
        (out, raw)
    }

    #[test]
    fn a_streamed_vmdk_reads_back_as_the_disk_in_qemu() {
        let (vmdk, raw) = encode(DiskFormat::Vmdk);
        let dir = std::env::temp_dir().join(format!("dczone-vmdk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (v, r) = (dir.join("d.vmdk"), dir.join("d.raw"));
        std::fs::write(&v, &vmdk).unwrap();
        std::fs::write(&r, &raw).unwrap();
        let info = qemu_img(&["info", "--output=json", v.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "vmdk");
        assert_eq!(info["virtual-size"], SIZE);
        assert_eq!(
            info["format-specific"]["data"]["create-type"],
            "streamOptimized"
        );
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "vmdk",
            "-F",
            "raw",
            v.to_str().unwrap(),
            r.to_str().unwrap(),
        ]);
        assert!(
            cmp.status.success(),
            "{}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        // Grains of zeroes are left out: the grains of data (the first two touched, one
        // far in spanning two, one stored) and their tables, not 1000 grains.
        assert!(vmdk.len() < 200 << 10, "{} bytes", vmdk.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Where a stream-optimized VMDK's first grain ends (its sectors whole).
    fn first_grain_end(v: &[u8]) -> usize {
        let at = u64::from_le_bytes(v[64..72].try_into().unwrap()) as usize * 512;
        let size = u32::from_le_bytes(v[at + 8..at + 12].try_into().unwrap());
        (at + 12 + size as usize).next_multiple_of(512)
    }

    /// Reads a stream-optimized VMDK front to back into a disk image.
    fn read_back(vmdk: &[u8]) -> Vec<u8> {
        let (mut r, size) = vmdk::StreamReader::open(vmdk).unwrap();
        let mut disk = vec![0u8; size as usize];
        while let Some((off, data)) = r.next_grain().unwrap() {
            disk[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        disk
    }

    #[test]
    fn a_vmdk_stream_reads_back_as_written_by_dczone_and_by_qemu() {
        let (vmdk, raw) = encode(DiskFormat::Vmdk);
        assert!(read_back(&vmdk) == raw);
        // qemu-img's own stream-optimized VMDK of the same disk.
        let dir = std::env::temp_dir().join(format!("dczone-vmdk-q-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (v, r) = (dir.join("q.vmdk"), dir.join("d.raw"));
        std::fs::write(&r, &raw).unwrap();
        let out = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            r.to_str().unwrap(),
            v.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let q = std::fs::read(&v).unwrap();
        assert!(read_back(&q) == raw);
        // Either stream cut after its first grain (at a marker) is refused, not taken for
        // a shorter disk: dczone's ends with its end-of-stream marker, qemu-img's with the
        // last of the grains its tables name.
        for (stream, says) in [
            (&vmdk, "before its end-of-stream marker"),
            (&q, "after 1 of the 5 grains its tables name"),
        ] {
            let cut = &stream[..first_grain_end(stream)];
            let (mut r, _) = vmdk::StreamReader::open(cut).unwrap();
            let e = loop {
                match r.next_grain() {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("a cut stream read to its end"),
                    Err(e) => break e,
                }
            };
            assert!(e.to_string().contains(says), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_vmdk_that_is_not_a_stream_is_told_apart() {
        let dir = std::env::temp_dir().join(format!("dczone-vmdk-m-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = dir.join("m.vmdk");
        let out = qemu_img(&["create", "-f", "vmdk", v.to_str().unwrap(), "1M"]);
        assert!(out.status.success());
        let m = std::fs::read(&v).unwrap();
        assert!(matches!(
            vmdk::StreamReader::open(&m[..]),
            Err(vmdk::ReadError::NotStreamOptimized)
        ));
        assert!(vmdk::StreamReader::open(&[0u8; 512][..]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_streamed_raw_image_is_the_disk() {
        let (img, raw) = encode(DiskFormat::Raw);
        assert!(img == raw);
    }

    #[test]
    fn data_out_of_order_is_refused() {
        for f in [DiskFormat::Vmdk, DiskFormat::Raw] {
            let mut e = Encoder::new(f, SIZE, Vec::new(), 1).unwrap();
            e.data(2 * GRAIN, &[1; 10]).unwrap();
            let err = e.data(0, &[1; 10]).unwrap_err();
            assert!(err.to_string().contains("must come in order"), "{err}");
            // Within one grain too.
            let err = e.data(2 * GRAIN + 5, &[1; 10]).unwrap_err();
            assert!(err.to_string().contains("must come in order"), "{err}");
            let err = e.data(SIZE - 1, &[1; 10]).unwrap_err();
            assert!(err.to_string().contains("past the disk's"), "{err}");
        }
    }

    #[test]
    fn an_upload_that_stops_taking_parts_fails_the_writer_at_once() {
        let (mut w, src) = parts(10, 1);
        drop(src);
        let err = w.write_all(&[7u8; 30]).unwrap_err();
        assert!(err.to_string().contains(UPLOAD_STOPPED), "{err}");
        // And an encoder writing into it stops with it.
        let (w, src) = parts(crate::s3::MIN_PART, 1);
        drop(src);
        let mut e = Encoder::new(DiskFormat::Raw, SIZE, w, 1).unwrap();
        let err = e.data(0, &vec![1u8; 8 << 20]).unwrap_err();
        assert!(err.to_string().contains(UPLOAD_STOPPED), "{err}");
        // A VMDK's grains go through threads: the data's error is still the upload's,
        // not "the writer stopped".
        let (w, src) = parts(crate::s3::MIN_PART, 1);
        drop(src);
        let mut e = Encoder::new(DiskFormat::Vmdk, SIZE, w, 2).unwrap();
        // Noise: stored grains, so that parts fill.
        let noise = crate::vmdk::noise(1 << 20);
        let mut err = None;
        for k in 0..(SIZE >> 20) {
            if let Err(x) = e.data(k << 20, &noise) {
                err = Some(x);
                break;
            }
        }
        let err = match err {
            Some(e) => e,
            None => match e.finish() {
                Ok(_) => panic!("an encoder into a stopped upload finished"),
                Err(e) => e,
            },
        };
        assert!(err.to_string().contains(UPLOAD_STOPPED), "{err}");
    }

    #[test]
    fn parts_are_cut_to_size_and_an_unfinished_stream_is_an_error() {
        let (mut w, src) = parts(10, 8);
        w.write_all(&[7u8; 25]).unwrap();
        w.finish().unwrap();
        let got: Vec<usize> = std::iter::from_fn(|| src.next())
            .map(|p| p.unwrap().len())
            .collect();
        assert_eq!(got, [10, 10, 5]);
        let (mut w, src) = parts(10, 8);
        w.write_all(&[7u8; 20]).unwrap();
        w.finish().unwrap();
        let got: Vec<usize> = std::iter::from_fn(|| src.next())
            .map(|p| p.unwrap().len())
            .collect();
        assert_eq!(got, [10, 10], "no empty last part");
        let (w, src) = parts(10, 8);
        w.finish().unwrap();
        assert_eq!(
            src.next().unwrap().unwrap().len(),
            0,
            "an empty stream, one empty part"
        );
        assert!(src.next().is_none());
        let (mut w, src) = parts(10, 8);
        w.write_all(&[7u8; 12]).unwrap();
        drop(w);
        assert_eq!(src.next().unwrap().unwrap().len(), 10);
        assert!(src.next().unwrap().is_err());
        assert!(src.next().is_none());
    }
}
