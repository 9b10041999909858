//! The public cloud as a separate party (issue 13). Nothing of the bank's side reaches
//! into the cloud except through its API, and the cloud's API takes only requests signed
//! with an account's key, as a real cloud's does: [`sigv4`] is AWS Signature Version 4,
//! used by both ends, so that pointing dczone at a real cloud is a configuration change.

pub mod ec2;
pub mod sigv4;
