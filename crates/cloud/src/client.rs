//! dczone's client of a cloud's compute API: EC2's Query API (POST, form body), each
//! request signed with SigV4, answers read from EC2's XML. Against a real EC2 region only
//! the account's endpoint, region and keys change.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ec2::{DiskFormat, IpPermission, VERSION};
use crate::provider::LogEntry;
use crate::{sigv4, Account};

#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    #[error("the compute API at {endpoint} did not answer {action}: {reason}")]
    Unreachable {
        endpoint: String,
        action: String,
        reason: String,
    },
    #[error("{action} refused ({status} {code}): {message}")]
    Refused {
        action: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{action}: an unreadable answer: {reason}")]
    Unreadable { action: String, reason: String },
}

impl ApiCallError {
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiCallError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An import task as `DescribeImportImageTasks` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportStatus {
    pub id: String,
    pub status: String,
    pub status_message: String,
    pub progress: u32,
    pub image_id: Option<String>,
}

/// An image as `DescribeImages` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub id: String,
    pub state: String,
    /// Its disk's size, GiB (rounded up, as EC2's `volumeSize`).
    pub size_gib: u64,
}

/// A security group as `DescribeSecurityGroups` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupInfo {
    pub id: String,
    pub name: String,
    pub description: String,
    /// Its ingress rules, as `tcp/8080 from 10.0.0.0/8`.
    pub rules: Vec<String>,
}

/// An instance as `DescribeInstances` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub image_id: String,
    pub state: String,
    pub ip: String,
    pub instance_type: String,
    pub launch_time: String,
    pub groups: Vec<String>,
}

#[derive(Debug)]
pub struct Compute {
    account: Account,
    agent: ureq::Agent,
    /// Added to this machine's clock when signing (tests of a skewed clock).
    pub clock_offset_s: i64,
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn text_of(node: roxmltree::Node<'_, '_>, tag: &str) -> String {
    node.children()
        .find(|n| n.has_tag_name(tag))
        .and_then(|n| n.text())
        .unwrap_or_default()
        .to_string()
}

impl Compute {
    pub fn new(account: &Account) -> Compute {
        Compute {
            account: account.clone(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .timeout(Duration::from_secs(120))
                .build(),
            clock_offset_s: 0,
        }
    }

    /// Signs `parts` (path and query, and the signed headers) as SigV4 does.
    fn signed_headers(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: &[u8],
    ) -> Result<Vec<(String, String)>, String> {
        let url: url::Url = self.account.compute_endpoint.parse().map_err(|_| {
            format!(
                "compute endpoint {} is not a URL",
                self.account.compute_endpoint
            )
        })?;
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let mut headers = vec![
            ("host".to_string(), host),
            (
                "x-amz-date".to_string(),
                sigv4::amz_date(now_s() + self.clock_offset_s),
            ),
        ];
        if !body.is_empty() {
            headers.push((
                "content-type".into(),
                "application/x-www-form-urlencoded; charset=utf-8".into(),
            ));
        }
        let req = sigv4::Request {
            method,
            path,
            query,
            headers: &headers,
            payload_sha256: sigv4::sha256_hex(body),
        };
        let auth = sigv4::authorization(
            &self.account.credentials(),
            &self.account.region,
            "ec2",
            &req,
        );
        headers.push(("authorization".into(), auth));
        Ok(headers)
    }

    /// Sends one action; its answer's XML.
    pub fn call(&self, action: &str, params: &[(String, String)]) -> Result<String, ApiCallError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("Action", action);
        form.append_pair("Version", VERSION);
        for (k, v) in params {
            form.append_pair(k, v);
        }
        self.post("/", action, &form.finish())
    }

    /// A key pair of the account that expires in `expires_in_s` (the cloud's console,
    /// `POST /keys`): the account with that key.
    pub fn issue_key(&self, expires_in_s: u64) -> Result<Account, ApiCallError> {
        let action = "issue a key";
        let text = self.post("/keys", action, &format!("ExpiresIn={expires_in_s}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ApiCallError::Unreadable {
                action: action.into(),
                reason: e.to_string(),
            })?;
        let missing = |k: &str| ApiCallError::Unreadable {
            action: action.into(),
            reason: format!("the answer has no {k}: {text}"),
        };
        let field = |k: &str| {
            v[k].as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| missing(k))
        };
        let expires_ms = v["expires_unix_ms"]
            .as_u64()
            .ok_or_else(|| missing("expires_unix_ms"))?;
        Ok(Account {
            access_key: field("access_key")?,
            secret_key: field("secret_key")?,
            expires: Some(crate::provider::rfc3339(expires_ms)),
            ..self.account.clone()
        })
    }

    /// A signed form POST to `path`; the answer's body.
    fn post(&self, path: &str, action: &str, body: &str) -> Result<String, ApiCallError> {
        let unreachable = |reason: String| ApiCallError::Unreachable {
            endpoint: self.account.compute_endpoint.clone(),
            action: action.into(),
            reason,
        };
        let headers = self
            .signed_headers("POST", path, &[], body.as_bytes())
            .map_err(unreachable)?;
        let url = format!(
            "{}{}",
            self.account.compute_endpoint.trim_end_matches('/'),
            if path == "/" { "" } else { path }
        );
        let mut req = self.agent.post(&url);
        for (n, v) in &headers {
            if n != "host" {
                req = req.set(n, v);
            }
        }
        match req.send_string(body) {
            Ok(r) => r.into_string().map_err(|e| unreachable(e.to_string())),
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                let doc = roxmltree::Document::parse(&text).ok();
                let field = |t: &str| {
                    doc.as_ref()
                        .and_then(|d| d.descendants().find(|n| n.has_tag_name(t)))
                        .and_then(|n| n.text())
                        .unwrap_or_default()
                        .to_string()
                };
                Err(ApiCallError::Refused {
                    action: action.into(),
                    status,
                    code: field("Code"),
                    message: field("Message"),
                })
            }
            Err(ureq::Error::Transport(t)) => Err(unreachable(t.to_string())),
        }
    }

    fn parse<'a>(action: &str, text: &'a str) -> Result<roxmltree::Document<'a>, ApiCallError> {
        roxmltree::Document::parse(text).map_err(|e| ApiCallError::Unreadable {
            action: action.into(),
            reason: e.to_string(),
        })
    }

    pub fn import_image(
        &self,
        format: DiskFormat,
        bucket: &str,
        key: &str,
        description: &str,
    ) -> Result<String, ApiCallError> {
        let p = |k: &str, v: &str| (k.to_string(), v.to_string());
        let text = self.call(
            "ImportImage",
            &[
                p("Description", description),
                p("DiskContainer.1.Format", format.name()),
                p("DiskContainer.1.UserBucket.S3Bucket", bucket),
                p("DiskContainer.1.UserBucket.S3Key", key),
            ],
        )?;
        let doc = Self::parse("ImportImage", &text)?;
        Ok(text_of(doc.root_element(), "importTaskId"))
    }

    pub fn describe_import(&self, id: &str) -> Result<ImportStatus, ApiCallError> {
        let text = self.call(
            "DescribeImportImageTasks",
            &[("ImportTaskId.1".into(), id.into())],
        )?;
        let doc = Self::parse("DescribeImportImageTasks", &text)?;
        let item = doc
            .descendants()
            .find(|n| n.has_tag_name("item"))
            .ok_or_else(|| ApiCallError::Unreadable {
                action: "DescribeImportImageTasks".into(),
                reason: format!("no task {id} in the answer"),
            })?;
        let image = text_of(item, "imageId");
        Ok(ImportStatus {
            id: text_of(item, "importTaskId"),
            status: text_of(item, "status"),
            status_message: text_of(item, "statusMessage"),
            progress: text_of(item, "progress").parse().unwrap_or(0),
            image_id: (!image.is_empty()).then_some(image),
        })
    }

    pub fn create_security_group(
        &self,
        name: &str,
        description: &str,
    ) -> Result<String, ApiCallError> {
        let text = self.call(
            "CreateSecurityGroup",
            &[
                ("GroupName".into(), name.into()),
                ("GroupDescription".into(), description.into()),
            ],
        )?;
        let doc = Self::parse("CreateSecurityGroup", &text)?;
        Ok(text_of(doc.root_element(), "groupId"))
    }

    pub fn authorize_ingress(
        &self,
        group: &str,
        rules: &[IpPermission],
    ) -> Result<(), ApiCallError> {
        let mut params = vec![("GroupId".to_string(), group.to_string())];
        for (i, r) in rules.iter().enumerate() {
            let n = i + 1;
            params.push((format!("IpPermissions.{n}.IpProtocol"), r.protocol.clone()));
            if let Some(p) = r.from_port {
                params.push((format!("IpPermissions.{n}.FromPort"), p.to_string()));
            }
            if let Some(p) = r.to_port {
                params.push((format!("IpPermissions.{n}.ToPort"), p.to_string()));
            }
            for (j, c) in r.cidrs.iter().enumerate() {
                params.push((
                    format!("IpPermissions.{n}.IpRanges.{}.CidrIp", j + 1),
                    c.clone(),
                ));
            }
        }
        self.call("AuthorizeSecurityGroupIngress", &params)
            .map(|_| ())
    }

    /// The account's security groups (`DescribeSecurityGroups`).
    pub fn describe_security_groups(&self) -> Result<Vec<GroupInfo>, ApiCallError> {
        let text = self.call("DescribeSecurityGroups", &[])?;
        let doc = Self::parse("DescribeSecurityGroups", &text)?;
        Ok(groups_of(&doc))
    }

    /// Removes a security group (`DeleteSecurityGroup`): no running instance may be in it.
    pub fn delete_security_group(&self, group: &str) -> Result<(), ApiCallError> {
        self.call(
            "DeleteSecurityGroup",
            &[("GroupId".to_string(), group.to_string())],
        )
        .map(|_| ())
    }

    pub fn run_instance(
        &self,
        image: &str,
        instance_type: &str,
        groups: &[String],
    ) -> Result<InstanceInfo, ApiCallError> {
        let mut params = vec![
            ("ImageId".to_string(), image.to_string()),
            ("InstanceType".to_string(), instance_type.to_string()),
            ("MinCount".to_string(), "1".to_string()),
            ("MaxCount".to_string(), "1".to_string()),
        ];
        for (i, g) in groups.iter().enumerate() {
            params.push((format!("SecurityGroupId.{}", i + 1), g.clone()));
        }
        let text = self.call("RunInstances", &params)?;
        let doc = Self::parse("RunInstances", &text)?;
        instances_of(&doc)
            .into_iter()
            .next()
            .ok_or_else(|| ApiCallError::Unreadable {
                action: "RunInstances".into(),
                reason: "no instance in the answer".into(),
            })
    }

    pub fn describe_instances(&self, ids: &[String]) -> Result<Vec<InstanceInfo>, ApiCallError> {
        let params: Vec<(String, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (format!("InstanceId.{}", i + 1), id.clone()))
            .collect();
        let text = self.call("DescribeInstances", &params)?;
        let doc = Self::parse("DescribeInstances", &text)?;
        Ok(instances_of(&doc))
    }

    /// The account's images (`DescribeImages`).
    pub fn describe_images(&self) -> Result<Vec<ImageInfo>, ApiCallError> {
        let text = self.call("DescribeImages", &[])?;
        let doc = Self::parse("DescribeImages", &text)?;
        Ok(items_of(&doc, "imagesSet")
            .map(|item| ImageInfo {
                id: text_of(item, "imageId"),
                state: text_of(item, "imageState"),
                size_gib: item
                    .descendants()
                    .find(|n| n.has_tag_name("volumeSize"))
                    .and_then(|n| n.text())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0),
            })
            .collect())
    }

    /// Removes an imported image (`DeregisterImage`): its instances must be terminated.
    pub fn deregister_image(&self, image: &str) -> Result<(), ApiCallError> {
        self.call(
            "DeregisterImage",
            &[("ImageId".to_string(), image.to_string())],
        )
        .map(|_| ())
    }

    pub fn terminate(&self, ids: &[String]) -> Result<(), ApiCallError> {
        let params: Vec<(String, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (format!("InstanceId.{}", i + 1), id.clone()))
            .collect();
        self.call("TerminateInstances", &params).map(|_| ())
    }

    /// The cloud's execution log from `since_ms` (unix ms).
    pub fn log(&self, since_ms: u64) -> Result<Vec<LogEntry>, ApiCallError> {
        let query = vec![("since".to_string(), since_ms.to_string())];
        let action = "the execution log";
        let unreachable = |reason: String| ApiCallError::Unreachable {
            endpoint: self.account.compute_endpoint.clone(),
            action: action.into(),
            reason,
        };
        let headers = self
            .signed_headers("GET", "/log", &query, b"")
            .map_err(unreachable)?;
        let url = format!(
            "{}/log?since={since_ms}",
            self.account.compute_endpoint.trim_end_matches('/')
        );
        let mut req = self.agent.get(&url);
        for (n, v) in &headers {
            if n != "host" {
                req = req.set(n, v);
            }
        }
        match req.call() {
            Ok(r) => r.into_json().map_err(|e| ApiCallError::Unreadable {
                action: action.into(),
                reason: e.to_string(),
            }),
            Err(ureq::Error::Status(status, r)) => Err(ApiCallError::Refused {
                action: action.into(),
                status,
                code: String::new(),
                message: r.into_string().unwrap_or_default(),
            }),
            Err(ureq::Error::Transport(t)) => Err(unreachable(t.to_string())),
        }
    }
}

/// The `<item>`s of every `<set>` of an answer (EC2's lists).
fn items_of<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
    set: &'static str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    doc.descendants()
        .filter(move |n| n.has_tag_name(set))
        .flat_map(|s| s.children().filter(|n| n.has_tag_name("item")))
}

/// The groups of a `DescribeSecurityGroups` answer.
pub(crate) fn groups_of(doc: &roxmltree::Document<'_>) -> Vec<GroupInfo> {
    items_of(doc, "securityGroupInfo")
        .map(|item| GroupInfo {
            id: text_of(item, "groupId"),
            name: text_of(item, "groupName"),
            description: text_of(item, "groupDescription"),
            rules: item
                .children()
                .filter(|n| n.has_tag_name("ipPermissions"))
                .flat_map(|s| s.children().filter(|n| n.has_tag_name("item")))
                .map(|r| {
                    let ports = match (text_of(r, "fromPort"), text_of(r, "toPort")) {
                        (a, _) if a.is_empty() => String::new(),
                        (a, b) if a == b => format!("/{a}"),
                        (a, b) => format!("/{a}-{b}"),
                    };
                    let from: Vec<String> = r
                        .children()
                        .filter(|n| n.has_tag_name("ipRanges"))
                        .flat_map(|s| s.children().filter(|n| n.has_tag_name("item")))
                        .map(|c| text_of(c, "cidrIp"))
                        .collect();
                    format!(
                        "{}{ports} from {}",
                        text_of(r, "ipProtocol"),
                        from.join(" ")
                    )
                })
                .collect(),
        })
        .collect()
}

fn instances_of(doc: &roxmltree::Document<'_>) -> Vec<InstanceInfo> {
    items_of(doc, "instancesSet")
        .map(|item| InstanceInfo {
            id: text_of(item, "instanceId"),
            image_id: text_of(item, "imageId"),
            state: item
                .children()
                .find(|n| n.has_tag_name("instanceState"))
                .map(|s| text_of(s, "name"))
                .unwrap_or_default(),
            ip: text_of(item, "privateIpAddress"),
            instance_type: text_of(item, "instanceType"),
            launch_time: text_of(item, "launchTime"),
            groups: item
                .children()
                .find(|n| n.has_tag_name("groupSet"))
                .map(|g| {
                    g.children()
                        .filter(|n| n.has_tag_name("item"))
                        .map(|i| text_of(i, "groupId"))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}
