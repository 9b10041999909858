//! dczone's client of a cloud's object storage: S3, path-style, SigV4 in the query
//! (rusty-s3 builds the presigned URLs, ureq sends them). The same calls work against
//! radosgw, Garage or AWS; only the endpoint, region and keys differ.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2, S3Action as _};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use serde::{Deserialize, Serialize};

use crate::Account;

/// How long a presigned URL stays valid.
const SIGNED_FOR: Duration = Duration::from_secs(3600);

/// The smallest part S3 takes (but the last).
pub const MIN_PART: u64 = 5 << 20;

/// The most parts one upload may have.
pub const MAX_PARTS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("the object store's endpoint {0} is not a URL: fix the account's s3_endpoint")]
    Endpoint(String),
    #[error("{what}: the object store at {endpoint} did not answer: {reason}")]
    Unreachable {
        what: String,
        endpoint: String,
        reason: String,
    },
    #[error("{what}: the object store answered {status} {code}: {message}")]
    Refused {
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{what}: {reason}")]
    Other { what: String, reason: String },
    /// A multipart upload that failed, and whether its abort freed its parts.
    #[error("{cause}; {}", match abort_failed {
        None => format!("upload {upload_id} aborted: the store keeps none of its parts"),
        Some(why) => format!(
            "upload {upload_id} could not be aborted ({why}): its parts stay until it is \
             (`dczone cloud list` shows it, `dczone cloud abort-upload {upload_id}` frees them)"
        ),
    })]
    Failed {
        cause: Box<S3Error>,
        upload_id: String,
        abort_failed: Option<String>,
    },
}

impl S3Error {
    /// S3's error code (`NoSuchKey`, `QuotaExceeded`, `AccessDenied`...), if it answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            S3Error::Refused { code, .. } => Some(code),
            S3Error::Failed { cause, .. } => cause.code(),
            _ => None,
        }
    }

    /// The error of a failed multipart upload after its abort was tried.
    fn aborted(self, upload_id: &str, abort: Result<(), S3Error>) -> S3Error {
        S3Error::Failed {
            cause: Box::new(self),
            upload_id: upload_id.to_string(),
            abort_failed: abort.err().map(|e| e.to_string()),
        }
    }
}

/// How long one part may take, sent and answered: a minute, plus a second per MB (a
/// slow path's share). A part past it is tried again, up to the upload's retries.
pub fn part_timeout(bytes: u64) -> Duration {
    Duration::from_secs(60 + bytes / 1_000_000)
}

/// One bucket of an account.
#[derive(Debug)]
pub struct Store {
    bucket: Bucket,
    creds: Credentials,
    endpoint: String,
    agent: ureq::Agent,
}

/// One part of a multipart upload, timed from the upload's start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartTiming {
    pub n: u16,
    pub bytes: u64,
    pub sent_ms: f64,
    pub done_ms: f64,
}

/// What an upload took.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Upload {
    pub key: String,
    pub bytes: u64,
    /// From `CreateMultipartUpload` to `CompleteMultipartUpload` answered.
    pub ms: f64,
    pub parts: Vec<PartTiming>,
}

/// An object of the bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Object {
    pub key: String,
    pub bytes: u64,
    pub last_modified: String,
}

/// A multipart upload in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: String,
}

/// A `ListMultipartUploadsResult`'s uploads.
fn parse_uploads(body: &str) -> Result<Vec<PendingUpload>, String> {
    let doc =
        roxmltree::Document::parse(body).map_err(|e| format!("an unreadable listing: {e}"))?;
    let field = |n: roxmltree::Node<'_, '_>, tag: &str| {
        n.children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|c| c.text())
            .unwrap_or_default()
            .to_string()
    };
    if !doc
        .root_element()
        .has_tag_name("ListMultipartUploadsResult")
    {
        return Err(format!(
            "<{}> where ListMultipartUploadsResult was expected",
            doc.root_element().tag_name().name()
        ));
    }
    Ok(doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("Upload"))
        .map(|u| PendingUpload {
            key: field(u, "Key"),
            upload_id: field(u, "UploadId"),
            initiated: field(u, "Initiated"),
        })
        .collect())
}

fn body_of(r: ureq::Response) -> String {
    r.into_string().unwrap_or_default()
}

/// S3's `<Code>` and `<Message>` of an error body.
fn error_fields(body: &str) -> (String, String) {
    let doc = roxmltree::Document::parse(body).ok();
    let field = |name: &str| {
        doc.as_ref()
            .and_then(|d| d.descendants().find(|n| n.has_tag_name(name)))
            .and_then(|n| n.text())
            .unwrap_or_default()
            .to_string()
    };
    (field("Code"), field("Message"))
}

impl Store {
    pub fn new(account: &Account) -> Result<Store, S3Error> {
        let url = account
            .s3_endpoint
            .parse()
            .map_err(|_| S3Error::Endpoint(account.s3_endpoint.clone()))?;
        let bucket = Bucket::new(
            url,
            UrlStyle::Path,
            account.bucket.clone(),
            account.region.clone(),
        )
        .map_err(|_| S3Error::Endpoint(account.s3_endpoint.clone()))?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(120))
            .timeout_write(Duration::from_secs(120))
            .build();
        Ok(Store {
            bucket,
            creds: Credentials::new(account.access_key.clone(), account.secret_key.clone()),
            endpoint: account.s3_endpoint.clone(),
            agent,
        })
    }

    fn fail(&self, what: &str, e: ureq::Error) -> S3Error {
        match e {
            ureq::Error::Status(status, r) => {
                let (code, mut message) = error_fields(&body_of(r));
                if message.is_empty() && code == "QuotaExceeded" {
                    message = "a storage quota (the account's or the bucket's) is used up: \
                               delete objects it no longer needs, or have the quota raised"
                        .into();
                }
                S3Error::Refused {
                    what: what.into(),
                    status,
                    code,
                    message,
                }
            }
            ureq::Error::Transport(t) => S3Error::Unreachable {
                what: what.into(),
                endpoint: self.endpoint.clone(),
                reason: t.to_string(),
            },
        }
    }

    /// Creates the bucket; one that is already the account's is fine.
    pub fn create_bucket(&self) -> Result<(), S3Error> {
        let url = self.bucket.create_bucket(&self.creds).sign(SIGNED_FOR);
        let what = format!("create bucket {}", self.bucket.name());
        match self.agent.put(url.as_str()).call() {
            Ok(_) => Ok(()),
            Err(e) => match self.fail(&what, e) {
                S3Error::Refused { code, .. } if code == "BucketAlreadyOwnedByYou" => Ok(()),
                e => Err(e),
            },
        }
    }

    /// The object's size, or `None` if there is no such object.
    pub fn head(&self, key: &str) -> Result<Option<u64>, S3Error> {
        let url = self
            .bucket
            .head_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        match self.agent.head(url.as_str()).call() {
            Ok(r) => Ok(r.header("content-length").and_then(|v| v.parse().ok())),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(self.fail(&format!("look up object {key}"), e)),
        }
    }

    /// Every object (up to 1,000: a cloud account of migrations holds a few).
    pub fn list(&self) -> Result<Vec<Object>, S3Error> {
        let url = ListObjectsV2::new(&self.bucket, Some(&self.creds)).sign(SIGNED_FOR);
        let what = format!("list bucket {}", self.bucket.name());
        let r = self
            .agent
            .get(url.as_str())
            .call()
            .map_err(|e| self.fail(&what, e))?;
        let parsed = ListObjectsV2::parse_response(&body_of(r)).map_err(|e| S3Error::Other {
            what,
            reason: format!("an unreadable listing: {e}"),
        })?;
        Ok(parsed
            .contents
            .into_iter()
            .map(|c| Object {
                key: c.key,
                bytes: c.size,
                last_modified: c.last_modified,
            })
            .collect())
    }

    pub fn delete(&self, key: &str) -> Result<(), S3Error> {
        let url = self
            .bucket
            .delete_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        self.agent
            .delete(url.as_str())
            .call()
            .map(|_| ())
            .map_err(|e| self.fail(&format!("delete object {key}"), e))
    }

    /// Writes the object into `file`; its bytes.
    pub fn download(&self, key: &str, file: &Path) -> Result<u64, S3Error> {
        let what = format!("read object {key}");
        let mut r = self.reader(key)?;
        let other = |reason: String| S3Error::Other {
            what: what.clone(),
            reason,
        };
        let mut out = std::fs::File::create(file)
            .map_err(|e| other(format!("create {}: {e}", file.display())))?;
        let n = std::io::copy(&mut r, &mut out)
            .map_err(|e| other(format!("the transfer broke off: {e}")))?;
        out.flush().map_err(|e| other(e.to_string()))?;
        Ok(n)
    }

    /// The object `key`, read as it arrives.
    pub fn reader(&self, key: &str) -> Result<Box<dyn std::io::Read + Send + Sync>, S3Error> {
        let url = self
            .bucket
            .get_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        let r = self
            .agent
            .get(url.as_str())
            .call()
            .map_err(|e| self.fail(&format!("read object {key}"), e))?;
        Ok(r.into_reader())
    }

    /// Uploads `file` as `key` in parts of `part_bytes`, `streams` at once. A failed part
    /// is tried again up to `retries` times (a store unreachable for a moment: the upload
    /// resumes); if it still fails, the multipart upload is aborted, so that the store
    /// keeps none of its parts, and the error says why.
    pub fn upload(
        &self,
        file: &Path,
        key: &str,
        part_bytes: u64,
        streams: usize,
        retries: u32,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Upload, S3Error> {
        let part_bytes = part_bytes.max(MIN_PART);
        let what = format!("upload {} as {key}", file.display());
        let other = |reason: String| S3Error::Other {
            what: what.clone(),
            reason,
        };
        let f = std::fs::File::open(file)
            .map_err(|e| other(format!("read {}: {e}", file.display())))?;
        let total = f
            .metadata()
            .map_err(|e| other(format!("read {}: {e}", file.display())))?
            .len();
        let n_parts = total.div_ceil(part_bytes).max(1);
        if n_parts > MAX_PARTS {
            return Err(other(format!(
                "{n_parts} parts of {part_bytes} bytes: S3 takes at most {MAX_PARTS}; use larger parts"
            )));
        }
        let next = std::sync::Mutex::new(0u64);
        let source = || -> Option<Result<Vec<u8>, S3Error>> {
            use std::os::unix::fs::FileExt;
            let n = {
                let mut g = next.lock().unwrap_or_else(|e| e.into_inner());
                if *g >= n_parts {
                    return None;
                }
                *g += 1;
                *g - 1
            };
            let offset = n * part_bytes;
            let mut buf = vec![0u8; part_bytes.min(total - offset) as usize];
            Some(
                f.read_exact_at(&mut buf, offset)
                    .map(|_| buf)
                    .map_err(|e| other(format!("read {}: {e}", file.display()))),
            )
        };
        self.upload_parts(&source, key, Some(total), streams, retries, progress)
    }

    /// Uploads as `key` the parts `next` gives, in order, `streams` at once, as they come
    /// (a stream being made while it is sent: only the parts in flight, and those its
    /// source holds, are in memory). Every
    /// part but the last must have at least [`MIN_PART`] bytes. Retries and the abort on
    /// failure as [`Store::upload`]; a part that `next` fails to make aborts it too.
    pub fn upload_stream(
        &self,
        next: &(dyn Fn() -> Option<Result<Vec<u8>, S3Error>> + Sync),
        key: &str,
        streams: usize,
        retries: u32,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Upload, S3Error> {
        self.upload_parts(next, key, None, streams, retries, progress)
    }

    fn upload_parts(
        &self,
        next: &(dyn Fn() -> Option<Result<Vec<u8>, S3Error>> + Sync),
        key: &str,
        total: Option<u64>,
        streams: usize,
        retries: u32,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Upload, S3Error> {
        let t = Instant::now();
        let url = CreateMultipartUpload::new(&self.bucket, Some(&self.creds), key).sign(SIGNED_FOR);
        let r = self
            .agent
            .post(url.as_str())
            .call()
            .map_err(|e| self.fail(&format!("start the upload of {key}"), e))?;
        let created =
            CreateMultipartUpload::parse_response(&body_of(r)).map_err(|e| S3Error::Other {
                what: format!("upload {key}"),
                reason: format!("an unreadable CreateMultipartUpload answer: {e}"),
            })?;
        let upload_id = created.upload_id().to_string();
        let parts = match self.parts(next, key, &upload_id, total, streams, retries, t, progress) {
            Ok(p) => p,
            Err(e) => return Err(e.aborted(&upload_id, self.abort(key, &upload_id))),
        };
        let etags: Vec<String> = parts.iter().map(|(_, e)| e.clone()).collect();
        let complete = self.bucket.complete_multipart_upload(
            Some(&self.creds),
            key,
            &upload_id,
            etags.iter().map(String::as_str),
        );
        let url = complete.sign(SIGNED_FOR);
        if let Err(e) = self.agent.post(url.as_str()).send_string(&complete.body()) {
            let e = self.fail(&format!("complete the upload of {key}"), e);
            return Err(e.aborted(&upload_id, self.abort(key, &upload_id)));
        }
        Ok(Upload {
            key: key.into(),
            bytes: parts.iter().map(|(p, _)| p.bytes).sum(),
            ms: t.elapsed().as_secs_f64() * 1e3,
            parts: parts.into_iter().map(|(p, _)| p).collect(),
        })
    }

    /// Aborts a multipart upload: its parts are freed.
    pub fn abort(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let url = self
            .bucket
            .abort_multipart_upload(Some(&self.creds), key, upload_id)
            .sign(SIGNED_FOR);
        self.agent
            .delete(url.as_str())
            .timeout(Duration::from_secs(30))
            .call()
            .map(|_| ())
            .map_err(|e| self.fail(&format!("abort upload {upload_id} of {key}"), e))
    }

    /// The multipart uploads begun and neither completed nor aborted
    /// (`ListMultipartUploads`, up to 1,000): their parts take the store's space.
    pub fn uploads(&self) -> Result<Vec<PendingUpload>, S3Error> {
        // rusty-s3 has no action for it: its signer, on the bucket's URL with `?uploads`.
        let url = rusty_s3::signing::sign(
            &jiff::Timestamp::now(),
            rusty_s3::Method::Get,
            self.bucket.base_url().clone(),
            self.creds.key(),
            self.creds.secret(),
            self.creds.token(),
            self.bucket.region(),
            SIGNED_FOR.as_secs(),
            std::iter::once(("uploads", "")),
            std::iter::empty(),
        );
        let what = format!("list the uploads of bucket {}", self.bucket.name());
        let r = self
            .agent
            .get(url.as_str())
            .call()
            .map_err(|e| self.fail(&what, e))?;
        parse_uploads(&body_of(r)).map_err(|reason| S3Error::Other { what, reason })
    }

    #[allow(clippy::too_many_arguments)]
    fn parts(
        &self,
        next: &(dyn Fn() -> Option<Result<Vec<u8>, S3Error>> + Sync),
        key: &str,
        upload_id: &str,
        total: Option<u64>,
        streams: usize,
        retries: u32,
        t: Instant,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Vec<(PartTiming, String)>, S3Error> {
        // Parts are numbered as they are taken, under one lock: in the source's order.
        let taken = std::sync::Mutex::new(0u64);
        let done = std::sync::Mutex::new(Vec::new());
        let sent = std::sync::atomic::AtomicU64::new(0);
        let failure = std::sync::Mutex::new(None::<S3Error>);
        std::thread::scope(|s| {
            for _ in 0..streams.clamp(1, 16) {
                s.spawn(|| loop {
                    if failure.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        return;
                    }
                    let (n, buf) = {
                        let mut g = taken.lock().unwrap_or_else(|e| e.into_inner());
                        let buf = match next() {
                            None => return,
                            Some(Ok(b)) => b,
                            Some(Err(e)) => {
                                failure
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .get_or_insert(e);
                                return;
                            }
                        };
                        *g += 1;
                        (*g, buf)
                    };
                    if n > MAX_PARTS {
                        failure
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(S3Error::Other {
                                what: format!("upload {key}"),
                                reason: format!(
                                "more than {MAX_PARTS} parts: S3 takes no more; use larger parts"
                            ),
                            });
                        return;
                    }
                    let len = buf.len() as u64;
                    match self.part(&buf, key, upload_id, n as u16, retries, t) {
                        Ok(v) => {
                            let so_far =
                                sent.fetch_add(len, std::sync::atomic::Ordering::SeqCst) + len;
                            progress(so_far, total.unwrap_or(0));
                            done.lock().unwrap_or_else(|e| e.into_inner()).push(v);
                        }
                        Err(e) => {
                            failure
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
        done.sort_by_key(|(p, _)| p.n);
        Ok(done)
    }

    fn part(
        &self,
        buf: &[u8],
        key: &str,
        upload_id: &str,
        n: u16,
        retries: u32,
        t: Instant,
    ) -> Result<(PartTiming, String), S3Error> {
        let what = format!("part {n} of {key}");
        let other = |reason: String| S3Error::Other {
            what: what.clone(),
            reason,
        };
        let len = buf.len() as u64;
        let mut attempt = 0;
        loop {
            let sent_ms = t.elapsed().as_secs_f64() * 1e3;
            let url = self
                .bucket
                .upload_part(Some(&self.creds), key, n, upload_id)
                .sign(SIGNED_FOR);
            match self
                .agent
                .put(url.as_str())
                .timeout(part_timeout(len))
                .send_bytes(buf)
            {
                Ok(r) => {
                    let etag = r
                        .header("etag")
                        .ok_or_else(|| other("the store answered without an ETag".into()))?
                        .to_string();
                    return Ok((
                        PartTiming {
                            n,
                            bytes: len,
                            sent_ms,
                            done_ms: t.elapsed().as_secs_f64() * 1e3,
                        },
                        etag,
                    ));
                }
                Err(e) => {
                    let timed_out = t.elapsed().as_secs_f64() * 1e3 - sent_ms
                        >= part_timeout(len).as_secs_f64() * 1e3 - 1e3;
                    let e = match self.fail(&what, e) {
                        // Ceph blocks the writes of a full cluster: its gateway then
                        // neither answers nor refuses.
                        S3Error::Unreachable {
                            what,
                            endpoint,
                            reason,
                        } if timed_out => S3Error::Unreachable {
                            what,
                            endpoint,
                            reason: format!(
                                "{reason} (no answer within {} s: a full store blocks \
                                     writes, an unreachable one does not answer)",
                                part_timeout(len).as_secs()
                            ),
                        },
                        e => e,
                    };
                    // A store that refuses (full, denied) will refuse again; one that did
                    // not answer may be back.
                    let transient = matches!(e, S3Error::Unreachable { .. })
                        || matches!(&e, S3Error::Refused { status, .. } if *status >= 500);
                    if !transient || attempt >= retries {
                        return Err(e);
                    }
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uploads_of_a_listing() {
        // radosgw's answer to `GET /bucket?uploads` with two uploads begun.
        let body = r#"<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>dczone</Bucket><NextKeyMarker></NextKeyMarker><NextUploadIdMarker></NextUploadIdMarker><MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated><Upload><Key>vm1-1.vmdk</Key><UploadId>2~abc</UploadId><Initiator><ID>dczone</ID></Initiator><Initiated>2026-12-05T12:00:00.000Z</Initiated></Upload><Upload><Key>vm2-2.raw</Key><UploadId>2~def</UploadId><Initiated>2026-12-05T12:01:00.000Z</Initiated></Upload></ListMultipartUploadsResult>"#;
        let u = parse_uploads(body).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(
            (u[0].key.as_str(), u[0].upload_id.as_str()),
            ("vm1-1.vmdk", "2~abc")
        );
        assert_eq!(u[1].initiated, "2026-12-05T12:01:00.000Z");
        let none =
            r#"<ListMultipartUploadsResult><Bucket>dczone</Bucket></ListMultipartUploadsResult>"#;
        assert!(parse_uploads(none).unwrap().is_empty());
        // An error body is not taken for an empty listing.
        let err = parse_uploads("<Error><Code>AccessDenied</Code></Error>").unwrap_err();
        assert!(err.contains("<Error>"), "{err}");
    }
}
