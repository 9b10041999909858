//! The cloud's compute API: the subset of EC2's Query API (version 2016-11-15) that a
//! migration to the cloud needs, as EC2 spells it, so that dczone's client can be pointed
//! at a real cloud. A request is `Action=NAME&Version=2016-11-15&...` (a query string, or
//! a form body), lists are `Name.N` counted from 1, and an error is
//! `<Response><Errors><Error><Code>…` whose code clients act on.
//!
//! This module parses requests into [`Action`]s and renders errors; the server and the
//! responses of each action come with the cloud's state.

use std::collections::BTreeMap;

pub const VERSION: &str = "2016-11-15";
pub const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// A disk image's format, as `ImportImage` names it (`DiskContainer.1.Format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Vmdk,
    Vhd,
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn parse(s: &str) -> Option<DiskFormat> {
        match s.to_ascii_lowercase().as_str() {
            "vmdk" => Some(DiskFormat::Vmdk),
            "vhd" => Some(DiskFormat::Vhd),
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            _ => None,
        }
    }

    /// EC2's spelling.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Vmdk => "VMDK",
            DiskFormat::Vhd => "VHD",
            DiskFormat::Raw => "RAW",
            DiskFormat::Qcow2 => "QCOW2",
        }
    }
}

/// One ingress rule (`IpPermissions.N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPermission {
    /// `tcp`, `udp`, `icmp` or `-1` (every protocol).
    pub protocol: String,
    pub from_port: Option<u16>,
    pub to_port: Option<u16>,
    pub cidrs: Vec<String>,
}

/// A request of the subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ImportImage {
        description: Option<String>,
        format: DiskFormat,
        bucket: String,
        key: String,
    },
    DescribeImportImageTasks {
        ids: Vec<String>,
    },
    /// The account's images (all, or these).
    DescribeImages {
        ids: Vec<String>,
    },
    /// An imported image removed from the cloud's storage (no instance may use it).
    DeregisterImage {
        image_id: String,
    },
    RunInstances {
        image_id: String,
        instance_type: String,
        count: u32,
        security_groups: Vec<String>,
        subnet_id: Option<String>,
        private_ip: Option<String>,
    },
    DescribeInstances {
        ids: Vec<String>,
    },
    TerminateInstances {
        ids: Vec<String>,
    },
    CreateSecurityGroup {
        name: String,
        description: String,
    },
    AuthorizeSecurityGroupIngress {
        group_id: String,
        permissions: Vec<IpPermission>,
    },
    /// The account's security groups (all, or these), with their ingress rules.
    DescribeSecurityGroups {
        ids: Vec<String>,
    },
    /// A security group removed (no instance that is not terminated may be in it).
    DeleteSecurityGroup {
        group_id: String,
    },
}

/// An error as EC2 answers it: its code, what to fix, and the HTTP status (403 for the
/// authentication codes, 400 for the others).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        match self.code {
            "AuthFailure"
            | "SignatureDoesNotMatch"
            | "RequestExpired"
            | "UnauthorizedOperation" => 403,
            _ => 400,
        }
    }

    /// The XML body.
    pub fn xml(&self, request_id: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code>\
             <Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
            escape(self.code),
            escape(&self.message),
            escape(request_id)
        )
    }
}

impl From<crate::sigv4::AuthError> for ApiError {
    fn from(e: crate::sigv4::AuthError) -> ApiError {
        ApiError::new(e.code(), e.to_string())
    }
}

/// Text for an XML element or attribute.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A request's parameters by name (the last of a repeated name wins, as in EC2).
struct Params(BTreeMap<String, String>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn required(&self, name: &str) -> Result<&str, ApiError> {
        self.get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            ApiError::new(
                "MissingParameter",
                format!("the request must contain the parameter {name}"),
            )
        })
    }

    /// `PREFIX.1`, `PREFIX.2`, … until the first missing one.
    fn list(&self, prefix: &str) -> Vec<String> {
        (1..)
            .map_while(|n| self.get(&format!("{prefix}.{n}")).map(str::to_string))
            .collect()
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::new(
                        "InvalidParameterValue",
                        format!("{name} must be a number, not '{v}'"),
                    )
                })
            })
            .transpose()
    }
}

/// Parses a request's parameters (query or form, decoded). The version must be
/// [`VERSION`].
pub fn parse(params: &[(String, String)]) -> Result<Action, ApiError> {
    let p = Params(params.iter().cloned().collect());
    let action = p.required("Action")?;
    match p.get("Version") {
        Some(VERSION) => {}
        Some(v) => {
            return Err(ApiError::new(
                "InvalidParameterValue",
                format!("Version {v} is not served here: use {VERSION}"),
            ))
        }
        None => return Err(p.required("Version").unwrap_err()),
    }
    Ok(match action {
        "ImportImage" => {
            let format = p.required("DiskContainer.1.Format")?;
            let format = DiskFormat::parse(format).ok_or_else(|| {
                ApiError::new(
                    "InvalidParameterValue",
                    format!("disk format '{format}' is not one of VMDK, VHD, RAW, QCOW2"),
                )
            })?;
            Action::ImportImage {
                description: p.get("Description").map(str::to_string),
                format,
                bucket: p.required("DiskContainer.1.UserBucket.S3Bucket")?.into(),
                key: p.required("DiskContainer.1.UserBucket.S3Key")?.into(),
            }
        }
        "DescribeImportImageTasks" => Action::DescribeImportImageTasks {
            ids: p.list("ImportTaskId"),
        },
        "DescribeImages" => Action::DescribeImages {
            ids: p.list("ImageId"),
        },
        "DeregisterImage" => Action::DeregisterImage {
            image_id: p.required("ImageId")?.into(),
        },
        "RunInstances" => {
            let min: u32 = p.number("MinCount")?.unwrap_or(1);
            let max: u32 = p.number("MaxCount")?.unwrap_or(min);
            if min == 0 || max < min {
                return Err(ApiError::new(
                    "InvalidParameterValue",
                    format!(
                        "MinCount {min} and MaxCount {max}: at least 1, and MaxCount >= MinCount"
                    ),
                ));
            }
            Action::RunInstances {
                image_id: p.required("ImageId")?.into(),
                instance_type: p.required("InstanceType")?.into(),
                count: max,
                security_groups: p.list("SecurityGroupId"),
                subnet_id: p.get("SubnetId").map(str::to_string),
                private_ip: p.get("PrivateIpAddress").map(str::to_string),
            }
        }
        "DescribeInstances" => Action::DescribeInstances {
            ids: p.list("InstanceId"),
        },
        "TerminateInstances" => {
            let ids = p.list("InstanceId");
            if ids.is_empty() {
                return Err(p.required("InstanceId.1").unwrap_err());
            }
            Action::TerminateInstances { ids }
        }
        "CreateSecurityGroup" => Action::CreateSecurityGroup {
            name: p.required("GroupName")?.into(),
            description: p.required("GroupDescription")?.into(),
        },
        "AuthorizeSecurityGroupIngress" => {
            let mut permissions = Vec::new();
            for n in 1.. {
                let prefix = format!("IpPermissions.{n}");
                let Some(protocol) = p.get(&format!("{prefix}.IpProtocol")) else {
                    break;
                };
                permissions.push(permission(&p, &prefix, protocol)?);
            }
            if permissions.is_empty() {
                return Err(p.required("IpPermissions.1.IpProtocol").unwrap_err());
            }
            Action::AuthorizeSecurityGroupIngress {
                group_id: p.required("GroupId")?.into(),
                permissions,
            }
        }
        "DescribeSecurityGroups" => Action::DescribeSecurityGroups {
            ids: p.list("GroupId"),
        },
        "DeleteSecurityGroup" => Action::DeleteSecurityGroup {
            group_id: p.required("GroupId")?.into(),
        },
        other => {
            return Err(ApiError::new(
                "InvalidAction",
                format!(
                    "action {other} is not served here: ImportImage, DescribeImportImageTasks, \
                     DescribeImages, DeregisterImage, RunInstances, DescribeInstances, TerminateInstances, \
                     CreateSecurityGroup, AuthorizeSecurityGroupIngress, DescribeSecurityGroups, \
                     DeleteSecurityGroup"
                ),
            ))
        }
    })
}

fn permission(p: &Params, prefix: &str, protocol: &str) -> Result<IpPermission, ApiError> {
    let protocol = protocol.to_ascii_lowercase();
    if !["tcp", "udp", "icmp", "-1"].contains(&protocol.as_str()) {
        return Err(ApiError::new(
            "InvalidParameterValue",
            format!("{prefix}.IpProtocol '{protocol}' is not tcp, udp, icmp or -1"),
        ));
    }
    let from_port: Option<u16> = p.number(&format!("{prefix}.FromPort"))?;
    let to_port: Option<u16> = p.number(&format!("{prefix}.ToPort"))?;
    if (protocol == "tcp" || protocol == "udp") && (from_port.is_none() || to_port.is_none()) {
        return Err(ApiError::new(
            "MissingParameter",
            format!("{prefix} ({protocol}) needs FromPort and ToPort"),
        ));
    }
    if let (Some(f), Some(t)) = (from_port, to_port) {
        if f > t {
            return Err(ApiError::new(
                "InvalidParameterValue",
                format!("{prefix}: FromPort {f} is above ToPort {t}"),
            ));
        }
    }
    let cidrs: Vec<String> = (1..)
        .map_while(|n| {
            p.get(&format!("{prefix}.IpRanges.{n}.CidrIp"))
                .map(str::to_string)
        })
        .collect();
    for c in &cidrs {
        if !valid_cidr(c) {
            return Err(ApiError::new(
                "InvalidParameterValue",
                format!("{prefix}: '{c}' is not an IPv4 CIDR (a.b.c.d/n)"),
            ));
        }
    }
    Ok(IpPermission {
        protocol,
        from_port,
        to_port,
        cidrs,
    })
}

fn valid_cidr(c: &str) -> bool {
    let Some((ip, len)) = c.split_once('/') else {
        return false;
    };
    ip.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v = vec![("Version".to_string(), VERSION.to_string())];
        v.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        v
    }

    #[test]
    fn the_subsets_actions_parse_as_ec2_spells_them() {
        let a = parse(&params(&[
            ("Action", "ImportImage"),
            ("Description", "web1"),
            ("DiskContainer.1.Format", "vmdk"),
            ("DiskContainer.1.UserBucket.S3Bucket", "images"),
            ("DiskContainer.1.UserBucket.S3Key", "web1.vmdk"),
        ]))
        .unwrap();
        assert_eq!(
            a,
            Action::ImportImage {
                description: Some("web1".into()),
                format: DiskFormat::Vmdk,
                bucket: "images".into(),
                key: "web1.vmdk".into(),
            }
        );
        let a = parse(&params(&[
            ("Action", "RunInstances"),
            ("ImageId", "ami-1"),
            ("InstanceType", "t3.small"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("SecurityGroupId.1", "sg-1"),
            ("SecurityGroupId.2", "sg-2"),
            ("PrivateIpAddress", "10.77.4.101"),
        ]))
        .unwrap();
        assert_eq!(
            a,
            Action::RunInstances {
                image_id: "ami-1".into(),
                instance_type: "t3.small".into(),
                count: 1,
                security_groups: vec!["sg-1".into(), "sg-2".into()],
                subnet_id: None,
                private_ip: Some("10.77.4.101".into()),
            }
        );
        let a = parse(&params(&[
            ("Action", "AuthorizeSecurityGroupIngress"),
            ("GroupId", "sg-1"),
            ("IpPermissions.1.IpProtocol", "tcp"),
            ("IpPermissions.1.FromPort", "7000"),
            ("IpPermissions.1.ToPort", "7000"),
            ("IpPermissions.1.IpRanges.1.CidrIp", "10.77.2.0/24"),
            ("IpPermissions.2.IpProtocol", "icmp"),
        ]))
        .unwrap();
        let Action::AuthorizeSecurityGroupIngress { permissions, .. } = a else {
            panic!("{a:?}")
        };
        assert_eq!(permissions.len(), 2);
        assert_eq!(permissions[0].cidrs, ["10.77.2.0/24"]);
        assert_eq!(
            (permissions[0].from_port, permissions[0].to_port),
            (Some(7000), Some(7000))
        );
        assert_eq!(permissions[1].protocol, "icmp");
        assert_eq!(
            parse(&params(&[
                ("Action", "TerminateInstances"),
                ("InstanceId.1", "i-1"),
                ("InstanceId.2", "i-2")
            ])),
            Ok(Action::TerminateInstances {
                ids: vec!["i-1".into(), "i-2".into()]
            })
        );
    }

    #[test]
    fn security_groups_are_listed_and_deleted_by_id() {
        assert_eq!(
            parse(&params(&[
                ("Action", "DescribeSecurityGroups"),
                ("GroupId.1", "sg-1")
            ])),
            Ok(Action::DescribeSecurityGroups {
                ids: vec!["sg-1".into()]
            })
        );
        assert_eq!(
            parse(&params(&[
                ("Action", "DeleteSecurityGroup"),
                ("GroupId", "sg-1")
            ])),
            Ok(Action::DeleteSecurityGroup {
                group_id: "sg-1".into()
            })
        );
        let e = parse(&params(&[("Action", "DeleteSecurityGroup")])).unwrap_err();
        assert_eq!(e.code, "MissingParameter");
    }

    #[test]
    fn bad_requests_get_ec2s_codes_and_say_what_to_fix() {
        let code = |pairs: &[(&str, &str)]| parse(&params(pairs)).unwrap_err();
        let e = code(&[
            ("Action", "ImportImage"),
            ("DiskContainer.1.Format", "iso"),
            ("DiskContainer.1.UserBucket.S3Bucket", "images"),
            ("DiskContainer.1.UserBucket.S3Key", "x"),
        ]);
        assert_eq!(e.code, "InvalidParameterValue");
        assert!(
            e.message
                .contains("'iso' is not one of VMDK, VHD, RAW, QCOW2"),
            "{e}"
        );
        let e = code(&[("Action", "RunInstances"), ("InstanceType", "t3.small")]);
        assert_eq!((e.code, e.status()), ("MissingParameter", 400));
        assert!(e.message.contains("ImageId"), "{e}");
        assert_eq!(code(&[("Action", "RebootInstances")]).code, "InvalidAction");
        assert_eq!(
            code(&[("Action", "TerminateInstances")]).code,
            "MissingParameter"
        );
        let e = code(&[
            ("Action", "AuthorizeSecurityGroupIngress"),
            ("GroupId", "sg-1"),
            ("IpPermissions.1.IpProtocol", "tcp"),
            ("IpPermissions.1.FromPort", "80"),
            ("IpPermissions.1.ToPort", "80"),
            ("IpPermissions.1.IpRanges.1.CidrIp", "10.77.2.0/33"),
        ]);
        assert!(e.message.contains("not an IPv4 CIDR"), "{e}");
        let e = parse(&[
            ("Action".to_string(), "DescribeInstances".to_string()),
            ("Version".to_string(), "2014-01-01".to_string()),
        ])
        .unwrap_err();
        assert!(e.message.contains("use 2016-11-15"), "{e}");
    }

    #[test]
    fn errors_render_as_ec2s_xml() {
        let e: ApiError = crate::sigv4::AuthError::SignatureDoesNotMatch.into();
        assert_eq!(e.status(), 403);
        let xml = ApiError::new("InvalidParameterValue", "a < b & c").xml("req-1");
        assert!(
            xml.contains("<Code>InvalidParameterValue</Code><Message>a &lt; b &amp; c</Message>"),
            "{xml}"
        );
        assert!(
            xml.ends_with("<RequestID>req-1</RequestID></Response>"),
            "{xml}"
        );
    }
}
