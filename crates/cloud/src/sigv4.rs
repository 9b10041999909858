//! AWS Signature Version 4 (`AWS4-HMAC-SHA256`, header form), as AWS's "Create a signed
//! AWS API request" describes it: the client signs, the server recomputes and compares.
//!
//! ```text
//! canonical request = METHOD \n URI \n QUERY \n HEADERS \n SIGNED-HEADERS \n hex(sha256(body))
//! string to sign    = AWS4-HMAC-SHA256 \n X-Amz-Date \n DATE/REGION/SERVICE/aws4_request
//!                     \n hex(sha256(canonical request))
//! signing key       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, DATE), REGION), SERVICE),
//!                     "aws4_request")
//! signature         = hex(HMAC(signing key, string to sign))
//! ```
//!
//! The server's checks, in order, with the error codes EC2 answers: a missing or malformed
//! `Authorization`, or an unknown access key: `AuthFailure`; an `X-Amz-Date` more than
//! [`MAX_SKEW_S`] seconds from the server's clock: `RequestExpired`; a scope that is not the
//! server's (date, region, service) or a request that does not sign `host`:
//! `AuthFailure`; a signature that differs: `SignatureDoesNotMatch`. The comparison takes
//! the same time whatever the signatures (`Mac::verify_slice`).
//!
//! Paths are encoded once, as S3 does (the compute API's paths are `/`).

use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far a request's `X-Amz-Date` may be from the server's clock (EC2's window).
pub const MAX_SKEW_S: i64 = 15 * 60;

/// Everything but RFC 3986's unreserved characters is percent-encoded.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// A path keeps its slashes.
const ENCODE_PATH: &AsciiSet = &ENCODE.remove(b'/');

/// An account's key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
}

/// A request as it is signed: the query and headers as sent (names in any case), the
/// body's SHA-256 in hex.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Decoded names and values.
    pub query: &'a [(String, String)],
    pub headers: &'a [(String, String)],
    pub payload_sha256: String,
}

/// Why a request's signature is refused; [`AuthError::code`] is EC2's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the request is not signed: no Authorization header with {ALGORITHM}")]
    Missing,
    #[error("the Authorization header is malformed: {0}")]
    Malformed(String),
    #[error("access key {0} is unknown to this account")]
    UnknownKey(String),
    #[error("the request was signed at {signed}, {skew_s} s from the server's clock (at most {MAX_SKEW_S} s): check the client's clock")]
    Expired { signed: String, skew_s: i64 },
    #[error("the request's credential scope {got} is not this endpoint's {want}")]
    Scope { got: String, want: String },
    #[error("the request's signature does not match: check the secret key and the signed request")]
    SignatureDoesNotMatch,
}

impl AuthError {
    /// The EC2 error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Expired { .. } => "RequestExpired",
            AuthError::SignatureDoesNotMatch => "SignatureDoesNotMatch",
            _ => "AuthFailure",
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// `YYYYMMDDTHHMMSSZ` of a unix time.
pub fn amz_date(unix_s: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_s)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(time::macros::format_description!(
        "[year][month][day]T[hour][minute][second]Z"
    ))
    .expect("a fixed format")
}

fn parse_amz_date(s: &str) -> Option<i64> {
    let t = time::PrimitiveDateTime::parse(
        s,
        time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"),
    )
    .ok()?;
    Some(t.assume_utc().unix_timestamp())
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The canonical request over `signed` (lowercase header names, sorted).
pub fn canonical_request(req: &Request<'_>, signed: &[String]) -> String {
    let path = if req.path.is_empty() { "/" } else { req.path };
    let mut query: Vec<(String, String)> = req
        .query
        .iter()
        .map(|(k, v)| {
            (
                utf8_percent_encode(k, ENCODE).to_string(),
                utf8_percent_encode(v, ENCODE).to_string(),
            )
        })
        .collect();
    query.sort();
    let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let headers: String = signed
        .iter()
        .map(|name| {
            // Every value of a repeated header, comma-joined; runs of spaces become one.
            let value: Vec<String> = req
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            format!("{name}:{}\n", value.join(","))
        })
        .collect();
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        utf8_percent_encode(path, ENCODE_PATH),
        query.join("&"),
        headers,
        signed.join(";"),
        req.payload_sha256
    )
}

/// `DATE/REGION/SERVICE/aws4_request`.
pub fn scope(date: &str, region: &str, service: &str) -> String {
    format!("{date}/{region}/{service}/aws4_request")
}

/// The signing key of `secret` for a scope, and the string to sign of a canonical request
/// signed at `amz_date`.
fn key_and_string(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical: &str,
) -> (Vec<u8>, String) {
    let date = &amz_date[..8.min(amz_date.len())];
    let to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{}\n{}",
        scope(date, region, service),
        sha256_hex(canonical.as_bytes())
    );
    let key = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let key = hmac(&key, region.as_bytes());
    let key = hmac(&key, service.as_bytes());
    (hmac(&key, b"aws4_request"), to_sign)
}

/// The `Authorization` header's value for `req`, which must carry `host` and
/// `x-amz-date` (every header of `req` is signed).
pub fn authorization(
    creds: &Credentials,
    region: &str,
    service: &str,
    req: &Request<'_>,
) -> String {
    let mut signed: Vec<String> = req
        .headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    signed.sort();
    signed.dedup();
    let amz_date = header(req.headers, "x-amz-date").unwrap_or_default();
    let canonical = canonical_request(req, &signed);
    let (key, to_sign) = key_and_string(&creds.secret_key, amz_date, region, service, &canonical);
    let sig = hmac(&key, to_sign.as_bytes());
    format!(
        "{ALGORITHM} Credential={}/{}, SignedHeaders={}, Signature={}",
        creds.access_key,
        scope(&amz_date[..8.min(amz_date.len())], region, service),
        signed.join(";"),
        hex(&sig)
    )
}

/// Checks `req`'s `Authorization` against the account's keys (`secret_of` an access key)
/// at unix time `now_s`, for this endpoint's `region` and `service`; the access key that
/// signed it.
pub fn verify(
    req: &Request<'_>,
    secret_of: impl Fn(&str) -> Option<String>,
    region: &str,
    service: &str,
    now_s: i64,
) -> Result<String, AuthError> {
    let auth = header(req.headers, "authorization").ok_or(AuthError::Missing)?;
    let rest = auth
        .strip_prefix(ALGORITHM)
        .ok_or(AuthError::Missing)?
        .trim();
    let mut credential = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| AuthError::Malformed(format!("'{}' is not NAME=VALUE", part.trim())))?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => sig = Some(v),
            other => return Err(AuthError::Malformed(format!("unknown field {other}"))),
        }
    }
    let missing = |f: &str| AuthError::Malformed(format!("no {f}"));
    let credential = credential.ok_or_else(|| missing("Credential"))?;
    let signed: Vec<String> = signed
        .ok_or_else(|| missing("SignedHeaders"))?
        .split(';')
        .map(str::to_string)
        .collect();
    let sig = sig.ok_or_else(|| missing("Signature"))?;
    let (access_key, cred_scope) = credential
        .split_once('/')
        .ok_or_else(|| AuthError::Malformed("Credential is not KEY/SCOPE".into()))?;
    let secret = secret_of(access_key).ok_or_else(|| AuthError::UnknownKey(access_key.into()))?;
    let amz_date = header(req.headers, "x-amz-date")
        .ok_or_else(|| AuthError::Malformed("no X-Amz-Date header".into()))?;
    let signed_at = parse_amz_date(amz_date).ok_or_else(|| {
        AuthError::Malformed(format!("X-Amz-Date {amz_date} is not YYYYMMDDTHHMMSSZ"))
    })?;
    let skew_s = (now_s - signed_at).abs();
    if skew_s > MAX_SKEW_S {
        return Err(AuthError::Expired {
            signed: amz_date.into(),
            skew_s,
        });
    }
    let want = scope(&amz_date[..8], region, service);
    if cred_scope != want {
        return Err(AuthError::Scope {
            got: cred_scope.into(),
            want,
        });
    }
    if !signed.iter().any(|h| h == "host") || !signed.iter().any(|h| h == "x-amz-date") {
        return Err(AuthError::Malformed(
            "SignedHeaders must include host and x-amz-date".into(),
        ));
    }
    let given = (0..sig.len() / 2)
        .map(|i| u8::from_str_radix(sig.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| AuthError::Malformed("Signature is not hex".into()))?;
    let canonical = canonical_request(req, &signed);
    let (key, to_sign) = key_and_string(&secret, amz_date, region, service, &canonical);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(to_sign.as_bytes());
    mac.verify_slice(&given)
        .map_err(|_| AuthError::SignatureDoesNotMatch)?;
    Ok(access_key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's signature test suite (`aws-signing-test-suite/v4`): these credentials, at
    /// 2015-08-30 12:36:00 UTC, region us-east-1, service `service`.
    fn example() -> Credentials {
        Credentials {
            access_key: "AKIDEXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        }
    }
    const AT: &str = "20150830T123600Z";

    fn headers() -> Vec<(String, String)> {
        vec![
            ("Host".into(), "example.amazonaws.com".into()),
            ("X-Amz-Date".into(), AT.into()),
        ]
    }

    fn signed(method: &str, query: &[(String, String)]) -> String {
        let h = headers();
        let req = Request {
            method,
            path: "/",
            query,
            headers: &h,
            payload_sha256: sha256_hex(b""),
        };
        authorization(&example(), "us-east-1", "service", &req)
    }

    #[test]
    fn signatures_match_aws_test_suite() {
        let scope = "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                     SignedHeaders=host;x-amz-date, Signature=";
        assert_eq!(
            signed("GET", &[]),
            format!("{ALGORITHM} {scope}5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")
        );
        // get-vanilla-query-order-key-case: sorted by name.
        let q = [
            ("Param2".to_string(), "value2".to_string()),
            ("Param1".to_string(), "value1".to_string()),
        ];
        assert_eq!(
            signed("GET", &q),
            format!("{ALGORITHM} {scope}b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500")
        );
        assert_eq!(
            signed("POST", &[]),
            format!("{ALGORITHM} {scope}5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b")
        );
    }

    #[test]
    fn dates_round_trip() {
        let t = parse_amz_date(AT).unwrap();
        assert_eq!(t, 1_440_938_160);
        assert_eq!(amz_date(t), AT);
        assert!(parse_amz_date("2015-08-30").is_none());
    }

    /// A request signed with `creds` for us-east-1/ec2, then checked by a server that knows
    /// AKIDEXAMPLE, `delay_s` after it was signed, possibly with its body changed.
    fn check(
        creds: &Credentials,
        body: &[u8],
        sent_body: &[u8],
        delay_s: i64,
    ) -> Result<String, AuthError> {
        let q = [("Action".to_string(), "DescribeInstances".to_string())];
        let mut h = headers();
        let auth = authorization(
            creds,
            "us-east-1",
            "ec2",
            &Request {
                method: "POST",
                path: "/",
                query: &q,
                headers: &h,
                payload_sha256: sha256_hex(body),
            },
        );
        h.push(("Authorization".into(), auth));
        let req = Request {
            method: "POST",
            path: "/",
            query: &q,
            headers: &h,
            payload_sha256: sha256_hex(sent_body),
        };
        let secrets = |k: &str| (k == "AKIDEXAMPLE").then(|| example().secret_key);
        verify(
            &req,
            secrets,
            "us-east-1",
            "ec2",
            parse_amz_date(AT).unwrap() + delay_s,
        )
    }

    #[test]
    fn the_server_takes_a_signed_request_and_refuses_the_others() {
        assert_eq!(check(&example(), b"x", b"x", 30), Ok("AKIDEXAMPLE".into()));
        let wrong_secret = Credentials {
            secret_key: "not-the-secret".into(),
            ..example()
        };
        let e = check(&wrong_secret, b"x", b"x", 0).unwrap_err();
        assert_eq!(e, AuthError::SignatureDoesNotMatch);
        assert_eq!(e.code(), "SignatureDoesNotMatch");
        // A body changed on the way.
        assert_eq!(
            check(&example(), b"x", b"y", 0),
            Err(AuthError::SignatureDoesNotMatch)
        );
        let unknown = Credentials {
            access_key: "AKIDOTHER".into(),
            ..example()
        };
        let e = check(&unknown, b"x", b"x", 0).unwrap_err();
        assert_eq!(
            (e.code(), e),
            ("AuthFailure", AuthError::UnknownKey("AKIDOTHER".into()))
        );
        let e = check(&example(), b"x", b"x", MAX_SKEW_S + 1).unwrap_err();
        assert_eq!(e.code(), "RequestExpired");
        assert!(e.to_string().contains("check the client's clock"), "{e}");
    }

    #[test]
    fn an_unsigned_or_foreign_scope_request_is_refused() {
        let q: [(String, String); 0] = [];
        let h = headers();
        let req = Request {
            method: "GET",
            path: "/",
            query: &q,
            headers: &h,
            payload_sha256: sha256_hex(b""),
        };
        let secrets = |_: &str| Some(example().secret_key);
        let now = parse_amz_date(AT).unwrap();
        assert_eq!(
            verify(&req, secrets, "us-east-1", "ec2", now),
            Err(AuthError::Missing)
        );
        // Signed for another service: its scope is not this endpoint's.
        let mut h = headers();
        h.push((
            "Authorization".into(),
            authorization(&example(), "us-east-1", "s3", &req),
        ));
        let req = Request { headers: &h, ..req };
        let e = verify(&req, secrets, "us-east-1", "ec2", now).unwrap_err();
        assert!(matches!(e, AuthError::Scope { .. }), "{e:?}");
        assert_eq!(e.code(), "AuthFailure");
    }
}
