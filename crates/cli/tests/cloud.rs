//! End-to-end test of the migration to the public cloud (issue 13): the lab's cloud
//! provider (its own Ceph, radosgw, the EC2-subset API) on the cloud site's host, a VM of
//! DC1.2 exported, uploaded, imported and started there. The cloud is checked with an
//! independent client: curl, which signs with its own SigV4 (`--aws-sigv4`). Gated by
//! `DCZONE_E2E=1`; needs `scripts/build` and `scripts/deps` (Ceph, radosgw, nftables).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dczone_lab::sys;

mod common;

use common::{e2e_enabled, guest_ip, TestLab};

/// Requests to the ledger at `ip` from `host`, on one connection; `None` if no connection
/// was made within 3 s.
fn ask(lab: &TestLab, host: &str, ip: Ipv4Addr, requests: &[&str]) -> Option<Vec<String>> {
    let requests: Vec<String> = requests.iter().map(|r| r.to_string()).collect();
    sys::in_namespace(&lab.ns(host), move || {
        let s = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), Duration::from_secs(3))
            .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut out = Vec::new();
        for req in &requests {
            writeln!(w, "{req}").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            out.push(line.trim().to_string());
        }
        Some(out)
    })
    .unwrap()
    .join()
    .unwrap()
}

/// curl from `host` with the account's key (or another secret), signing with its own
/// SigV4 implementation for `service`; (HTTP status, body).
fn curl(
    lab: &TestLab,
    host: &str,
    creds: Option<(&str, &str)>,
    service: &str,
    extra: &[&str],
) -> (u16, String) {
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &lab.ns(host), "curl", "-s", "-m", "20"]);
    if let Some((ak, sk)) = creds {
        c.arg("--aws-sigv4")
            .arg(format!("aws:amz:dczone-cloud-1:{service}"))
            .arg("--user")
            .arg(format!("{ak}:{sk}"));
    }
    let out = c
        .args(extra)
        .args(["-w", "\n%{http_code}"])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn xml_field(body: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    body.split(&open)
        .nth(1)
        .and_then(|r| r.split(&format!("</{tag}>")).next())
        .unwrap_or_else(|| panic!("no <{tag}> in {body}"))
        .to_string()
}

/// An account file (`cloud ... --account FILE`) in the lab's state directory: its path.
fn account_file(lab: &TestLab, name: &str, account: &serde_json::Value) -> String {
    let f = lab.state_dir.join(format!("{name}-account.json"));
    std::fs::write(&f, account.to_string()).unwrap();
    f.to_str().unwrap().to_string()
}

fn stderr_of(lab: &TestLab, args: &[&str]) -> String {
    let out = lab.run(args);
    assert!(
        !out.status.success(),
        "dczone {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_vm_of_dc1_2_migrates_to_the_cloud_which_only_its_key_opens() {
    if !e2e_enabled() {
        return;
    }
    let lab = TestLab::new("cloud");
    lab.up();
    lab.ok(&["storage", "up"]);
    let vm = lab.json(&[
        "vm", "create", "app1", "--host", "dc1.2-h1", "--disk", "--json",
    ]);
    let ip = guest_ip(&vm);
    // Some transfers, and 24 MiB of data at rest, so that the image carries data.
    let before = ask(
        &lab,
        "dc1.1-client",
        ip,
        &["T 1 0 1 25", "T 2 1 2 7", "F 24", "B 1", "Z"],
    )
    .expect("the source VM answers");
    assert_eq!(before[0], "OK 1");

    // Bad input: nothing leaves the DC, the VM keeps running.
    let err = stderr_of(&lab, &["cloud", "migrate", "app1", "--format", "iso"]);
    assert!(err.contains("unknown disk format 'iso'"), "{err}");
    assert!(ask(&lab, "dc1.1-client", ip, &["Z"]).is_some());

    let account = lab.json(&["cloud", "up", "--json"]);
    let ak = account["access_key"].as_str().unwrap().to_string();
    let sk = account["secret_key"].as_str().unwrap().to_string();
    let s3 = account["s3_endpoint"].as_str().unwrap().to_string();
    let ec2 = account["compute_endpoint"].as_str().unwrap().to_string();
    assert_eq!(lab.json(&["cloud", "account", "--json"]), account);

    let report_file = lab.state_dir.join("cloud-migrate.json");
    lab.ok(&[
        "cloud",
        "migrate",
        "app1",
        "--format",
        "vmdk",
        "--json",
        report_file.to_str().unwrap(),
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
    let m = &report["vms"][0];
    assert!(report["source_running"].as_bool().unwrap(), "{report}");
    let object_bytes = m["object_bytes"].as_u64().unwrap();
    assert!(object_bytes > 20 << 20, "the image carries the data: {m}");
    for p in [
        "export", "convert", "transfer", "import", "settings", "start",
    ] {
        assert!(
            m["phases"][format!("{p}_ms")].as_f64().unwrap() > 0.0,
            "{p}: {m}"
        );
    }
    // A VMDK is streamed: its encoding (convert) overlaps the upload, which ends after it.
    assert_eq!(m["streamed"], true, "{m}");
    let phase = |p: &str| m["phases"][format!("{p}_ms")].as_f64().unwrap();
    assert!(
        phase("convert") <= phase("transfer") + 100.0,
        "the encoding within the upload: {m}"
    );
    let phases: f64 = ["export", "transfer", "import", "settings", "start"]
        .iter()
        .map(|p| phase(p))
        .sum();
    let t1 = m["t1_ms"].as_f64().unwrap();
    assert!(
        t1 >= phases && t1 < phases + 5_000.0,
        "T1 {t1} vs phases {phases}"
    );
    let events: Vec<&str> = m["cloud_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for e in [
        "import.start",
        "import.stream.start",
        "import.stream.end",
        "import.completed",
        "instance.running",
    ] {
        assert!(events.contains(&e), "{e} in the cloud's log: {events:?}");
    }

    // The object, seen by an independent S3 client.
    let key = m["object"].as_str().unwrap();
    let (code, head) = curl(
        &lab,
        "dc1.1-client",
        Some((&ak, &sk)),
        "s3",
        &[
            "-I",
            "-H",
            "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            &format!("{s3}/images/{key}"),
        ],
    );
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {object_bytes}")),
        "{head}"
    );

    // The instance answers with the ledger the VM had: its disk came along.
    let inst_ip: Ipv4Addr = m["ip"].as_str().unwrap().parse().unwrap();
    let after = ask(&lab, "dc1.1-client", inst_ip, &["B 1", "Z", "T 1 0 1 25"])
        .expect("the instance answers");
    assert_eq!(after[0], before[3], "balance of account 1");
    assert_eq!(after[1], before[4], "the conserved sum");
    assert_eq!(
        after[2], "DUP 1",
        "transfer 1 was applied before the export"
    );

    // Requests without the key, or signed with another secret, are refused.
    let describe = ["-d", "Action=DescribeInstances&Version=2016-11-15", &ec2];
    let (code, body) = curl(&lab, "dc1.1-client", None, "ec2", &describe);
    assert_eq!(
        (code, xml_field(&body, "Code").as_str()),
        (403, "AuthFailure"),
        "{body}"
    );
    let (code, body) = curl(
        &lab,
        "dc1.1-client",
        Some((&ak, "not-the-secret")),
        "ec2",
        &describe,
    );
    assert_eq!(
        (code, xml_field(&body, "Code").as_str()),
        (403, "SignatureDoesNotMatch"),
        "{body}"
    );
    let (code, body) = curl(&lab, "dc1.1-client", Some((&ak, &sk)), "ec2", &describe);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(m["instance"].as_str().unwrap()), "{body}");

    // A security group without a rule: the second instance of the image runs, and its
    // application port is closed until a rule opens it.
    let post = |params: &str| {
        curl(
            &lab,
            "dc1.1-client",
            Some((&ak, &sk)),
            "ec2",
            &["-d", &format!("{params}&Version=2016-11-15"), &ec2],
        )
    };
    let (code, body) = post("Action=CreateSecurityGroup&GroupName=closed&GroupDescription=nothing");
    assert_eq!(code, 200, "{body}");
    let sg = xml_field(&body, "groupId");
    let image = m["image"].as_str().unwrap();
    let (code, body) = post(&format!(
        "Action=RunInstances&ImageId={image}&InstanceType=d1.small&MinCount=1&MaxCount=1&SecurityGroupId.1={sg}"
    ));
    assert_eq!(code, 200, "{body}");
    let closed_id = xml_field(&body, "instanceId");
    let closed_ip: Ipv4Addr = xml_field(&body, "privateIpAddress").parse().unwrap();
    let serial = lab
        .state_dir
        .join("cloud")
        .join("cloud")
        .join("cloud")
        .join("instances")
        .join(&closed_id)
        .join("serial.log");
    let t = Instant::now();
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("dczone-guest: ledger listening")
    {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "{closed_id} never booted"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        ask(&lab, "dc1.1-client", closed_ip, &["Z"]).is_none(),
        "the security group lets a connection through that no rule allows"
    );
    let (code, body) = post(&format!(
        "Action=AuthorizeSecurityGroupIngress&GroupId={sg}&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=7000&IpPermissions.1.ToPort=7000&IpPermissions.1.IpRanges.1.CidrIp=10.77.0.0/16"
    ));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        ask(&lab, "dc1.1-client", closed_ip, &["B 1"]).expect("open once a rule allows it")[0],
        before[3]
    );

    // A key the cloud does not know: refused before anything leaves the DC.
    let mut wrong = account.clone();
    wrong["secret_key"] = "not-the-secret".into();
    let wrong_file = account_file(&lab, "wrong", &wrong);
    let err = stderr_of(
        &lab,
        &["cloud", "migrate", "app1", "--account", &wrong_file],
    );
    assert!(
        err.contains("refused the account") && err.contains("SignatureDoesNotMatch"),
        "{err}"
    );

    // A key the cloud issued for 3 s: both services take it, then neither; a migration
    // with it is refused before anything is exported, the source runs on.
    let temp = lab.json(&["cloud", "key", "--expires-in", "3", "--json"]);
    let issued = Instant::now();
    let (tak, tsk) = (
        temp["access_key"].as_str().unwrap().to_string(),
        temp["secret_key"].as_str().unwrap().to_string(),
    );
    assert_ne!(tak, ak);
    let list_s3 = |k: &str, s: &str| {
        curl(
            &lab,
            "dc1.1-client",
            Some((k, s)),
            "s3",
            &[
                "-H",
                "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                &format!("{s3}/images"),
            ],
        )
    };
    let describe_with = |k: &str, s: &str| {
        curl(
            &lab,
            "dc1.1-client",
            Some((k, s)),
            "ec2",
            &["-d", "Action=DescribeInstances&Version=2016-11-15", &ec2],
        )
    };
    assert_eq!(list_s3(&tak, &tsk).0, 200);
    assert_eq!(describe_with(&tak, &tsk).0, 200);
    assert!(
        issued.elapsed() < Duration::from_secs(3),
        "too slow to see it work"
    );
    std::thread::sleep(Duration::from_secs(3).saturating_sub(issued.elapsed()));
    // The compute API refuses it from its expiry on; the gateway once the provider has
    // taken it away (within a second or so).
    let (code, body) = loop {
        let (code, body) = list_s3(&tak, &tsk);
        if code != 200 || issued.elapsed() > Duration::from_secs(20) {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        code, 403,
        "the object store still takes an expired key: {body}"
    );
    let (code, body) = describe_with(&tak, &tsk);
    assert_eq!(
        (code, xml_field(&body, "Code").as_str()),
        (403, "AuthFailure"),
        "{body}"
    );
    assert!(xml_field(&body, "Message").contains("expired"), "{body}");
    let temp_file = account_file(&lab, "temp", &temp);
    let err = stderr_of(&lab, &["cloud", "migrate", "app1", "--account", &temp_file]);
    assert!(
        err.contains("expired") && err.contains("dczone cloud key"),
        "{err}"
    );
    assert!(ask(&lab, "dc1.1-client", ip, &["Z"]).is_some());

    // The security group given blocks the application port: reported once the cloud's
    // console says the application listens, not retried for minutes. A cold move
    // (`--stop-source`): the failed move starts the source again, its ledger intact.
    let (code, body) = post("Action=CreateSecurityGroup&GroupName=shut&GroupDescription=nothing");
    assert_eq!(code, 200, "{body}");
    let shut = xml_field(&body, "groupId");
    let t = Instant::now();
    let err = stderr_of(
        &lab,
        &[
            "cloud",
            "migrate",
            "app1",
            "--security-group",
            &shut,
            "--stop-source",
        ],
    );
    let reported = t.elapsed();
    assert!(
        err.contains("does not answer from the zone")
            && err.contains(&shut)
            && err.contains("app1 runs again in its DC"),
        "{err}"
    );
    let waited = Instant::now();
    let again = loop {
        if let Some(a) = ask(&lab, "dc1.1-client", ip, &["B 1", "Z"]) {
            break a;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "the source did not run again"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(again, [before[3].clone(), before[4].clone()]);
    assert!(
        reported < Duration::from_secs(180),
        "reported after {reported:?}"
    );
    let blocked_id = err
        .split("`dczone cloud terminate ")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .unwrap_or_else(|| panic!("no instance named in {err}"))
        .to_string();

    // An object that is no VMDK: the cloud's import fails and says why.
    let (code, body) = curl(
        &lab,
        "dc1.1-client",
        Some((&ak, &sk)),
        "s3",
        &[
            "-X",
            "PUT",
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            "--data-binary",
            "not a disk image",
            &format!("{s3}/images/garbage.vmdk"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = post("Action=ImportImage&DiskContainer.1.Format=VMDK&DiskContainer.1.UserBucket.S3Bucket=images&DiskContainer.1.UserBucket.S3Key=garbage.vmdk");
    assert_eq!(code, 200, "{body}");
    let task = xml_field(&body, "importTaskId");
    let t = Instant::now();
    let failed = loop {
        let (_, body) = post(&format!(
            "Action=DescribeImportImageTasks&ImportTaskId.1={task}"
        ));
        if xml_field(&body, "status") == "deleted" {
            break body;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{body}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        xml_field(&failed, "statusMessage").contains("not valid VMDK"),
        "{failed}"
    );

    // The path cut during the transfer: the parts in flight wait, and the upload resumes
    // once the path is back; the migration completes and its most delayed part shows the
    // cut. The path is slowed first (2 of its 25 Gbit/s), so that the transfer lasts
    // seconds and the cut falls inside it.
    lab.ok(&[
        "lab",
        "link",
        "set",
        "dc1.2",
        "cloud",
        "--bandwidth",
        "2Gbit",
    ]);
    let cut_file = lab.state_dir.join("cloud-migrate-cut.json");
    let child = lab
        .command()
        .args([
            "cloud",
            "migrate",
            "app1",
            "--json",
            cut_file.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let (code, body) = curl(
            &lab,
            "dc1.1-client",
            Some((&ak, &sk)),
            "s3",
            &[
                "-H",
                "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                &format!("{s3}/images?uploads="),
            ],
        );
        assert_eq!(code, 200, "{body}");
        if body.contains("<Upload>") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no upload began");
        std::thread::sleep(Duration::from_millis(50));
    }
    const CUT: Duration = Duration::from_secs(4);
    lab.ok(&["lab", "link", "cut", "dc1.2", "cloud"]);
    std::thread::sleep(CUT);
    lab.ok(&["lab", "link", "restore", "dc1.2", "cloud"]);
    let out = child.wait_with_output().unwrap();
    lab.ok(&[
        "lab",
        "link",
        "set",
        "dc1.2",
        "cloud",
        "--bandwidth",
        "25Gbit",
    ]);
    assert!(
        out.status.success(),
        "the migration did not survive a {CUT:?} cut: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cut_report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cut_file).unwrap()).unwrap();
    let c = &cut_report["vms"][0];
    assert!(
        c["most_delayed_part_ms"].as_f64().unwrap() >= CUT.as_millis() as f64,
        "the cut held no part: {c}"
    );
    let cut_ip: Ipv4Addr = c["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        ask(&lab, "dc1.1-client", cut_ip, &["B 1", "Z"]).expect("the instance answers"),
        [before[3].clone(), before[4].clone()]
    );
    // Its instance, image, group and object removed again.
    let cut_group = lab.json(&["cloud", "list", "--json"])["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == c["instance"])
        .map(|i| i["groups"][0].as_str().unwrap().to_string())
        .unwrap();
    lab.ok(&["cloud", "terminate", c["instance"].as_str().unwrap()]);
    lab.ok(&["cloud", "deregister", c["image"].as_str().unwrap()]);
    lab.ok(&["cloud", "delete", c["object"].as_str().unwrap()]);
    lab.ok(&["cloud", "delete-group", &cut_group]);

    // The store full mid-upload: the cloud's operator gives the bucket a quota of what it
    // holds plus 12 MiB (its usage read afresh at each write). The part past it is refused
    // with QuotaExceeded, not retried; the upload is aborted; the source runs on.
    let cloud_admin = |program: &str, args: &[&str]| -> String {
        let dir = lab.state_dir.join("cloud/cloud/cloud/ceph/cloud");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns("cloud-h1"), program, "-c"])
            .arg(dir.join("ceph.conf"))
            .args(["-n", "client.admin", "-k"])
            .arg(dir.join("keyring.client.admin"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cloud_admin(
        "ceph",
        &["config", "set", "client", "rgw_bucket_quota_ttl", "0"],
    );
    let stats: serde_json::Value = serde_json::from_str(&cloud_admin(
        "radosgw-admin",
        &["bucket", "stats", "--bucket", "images"],
    ))
    .unwrap();
    let used = stats["usage"]["rgw.main"]["size"].as_u64().unwrap();
    let objects_before = lab.json(&["cloud", "list", "--json"])["objects"]
        .as_array()
        .unwrap()
        .len();
    let quota = [
        "--quota-scope=bucket".to_string(),
        "--bucket=images".to_string(),
        format!("--max-size={}", used + (12 << 20)),
    ];
    let quota: Vec<&str> = quota.iter().map(String::as_str).collect();
    cloud_admin("radosgw-admin", &[&["quota", "set"], &quota[..]].concat());
    cloud_admin(
        "radosgw-admin",
        &[&["quota", "enable"], &quota[..2]].concat(),
    );
    let err = stderr_of(&lab, &["cloud", "migrate", "app1"]);
    cloud_admin(
        "radosgw-admin",
        &[&["quota", "disable"], &quota[..2]].concat(),
    );
    cloud_admin("ceph", &["config", "rm", "client", "rgw_bucket_quota_ttl"]);
    assert!(
        err.contains("QuotaExceeded")
            && err.contains("storage quota (the account's or the bucket's) is used up")
            && err.contains("aborted: the store keeps none of its parts"),
        "{err}"
    );
    assert_eq!(
        ask(&lab, "dc1.1-client", ip, &["B 1", "Z"]).expect("the source runs"),
        [before[3].clone(), before[4].clone()]
    );
    let listed = lab.json(&["cloud", "list", "--json"]);
    assert!(listed["uploads"].as_array().unwrap().is_empty(), "{listed}");
    assert_eq!(
        listed["objects"].as_array().unwrap().len(),
        objects_before,
        "{listed}"
    );

    // An upload begun and never completed (what a path lost mid-upload leaves, as the
    // abort cannot reach the store either) is listed, and aborted by its id.
    let (code, body) = curl(
        &lab,
        "dc1.1-client",
        Some((&ak, &sk)),
        "s3",
        &[
            "-X",
            "POST",
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            &format!("{s3}/images/left.vmdk?uploads="),
        ],
    );
    assert_eq!(code, 200, "{body}");
    let upload_id = xml_field(&body, "UploadId");

    // Clean-up through dczone: the instances, images, groups, objects and uploads go; an
    // image or a group in use is kept until its instances are gone.
    let listed = lab.json(&["cloud", "list", "--json"]);
    let uploads = listed["uploads"].as_array().unwrap();
    assert!(
        uploads
            .iter()
            .any(|u| u["upload_id"] == upload_id.as_str() && u["key"] == "left.vmdk"),
        "{listed}"
    );
    let groups: Vec<String> = listed["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    // The migration's own group, `closed` and `shut`.
    assert_eq!(groups.len(), 3, "{listed}");
    assert!(groups.contains(&sg) && groups.contains(&shut), "{listed}");
    assert!(
        listed["groups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["used_by"].as_array().unwrap().len() == 1),
        "each group holds one instance: {listed}"
    );
    let err = stderr_of(&lab, &["cloud", "delete-group", &shut]);
    assert!(
        err.contains("DependencyViolation") && err.contains("terminate them first"),
        "{err}"
    );
    let running = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] != "terminated")
        .count();
    assert_eq!(running, 3, "{listed}");
    assert_eq!(listed["objects"].as_array().unwrap().len(), 3, "{listed}");
    let images: Vec<String> = listed["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(images.len(), 2, "the two migrations' images: {listed}");
    let err = stderr_of(&lab, &["cloud", "deregister", image]);
    assert!(err.contains("terminate them first"), "{err}");
    lab.ok(&[
        "cloud",
        "terminate",
        m["instance"].as_str().unwrap(),
        &closed_id,
        &blocked_id,
    ]);
    let keys: Vec<String> = listed["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap().to_string())
        .collect();
    let mut delete = vec!["cloud", "delete"];
    delete.extend(keys.iter().map(String::as_str));
    lab.ok(&delete);
    let mut deregister = vec!["cloud", "deregister"];
    deregister.extend(images.iter().map(String::as_str));
    lab.ok(&deregister);
    let mut delete_groups = vec!["cloud", "delete-group"];
    delete_groups.extend(groups.iter().map(String::as_str));
    lab.ok(&delete_groups);
    // Another account's file (here a key the cloud issued) lists and removes as well.
    let issued = lab.json(&["cloud", "key", "--expires-in", "600", "--json"]);
    let issued_file = account_file(&lab, "issued", &issued);
    let seen = lab.json(&["cloud", "list", "--json", "--account", &issued_file]);
    assert!(
        seen["uploads"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["upload_id"] == upload_id.as_str()),
        "{seen}"
    );
    lab.ok(&[
        "cloud",
        "abort-upload",
        &upload_id,
        "--account",
        &issued_file,
    ]);
    let listed = lab.json(&["cloud", "list", "--json"]);
    assert!(listed["images"].as_array().unwrap().is_empty(), "{listed}");
    assert!(listed["groups"].as_array().unwrap().is_empty(), "{listed}");
    assert!(listed["uploads"].as_array().unwrap().is_empty(), "{listed}");
    assert!(
        listed["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["state"] == "terminated"),
        "{listed}"
    );
    assert!(listed["objects"].as_array().unwrap().is_empty(), "{listed}");
    assert!(
        ask(&lab, "dc1.1-client", inst_ip, &["Z"]).is_none(),
        "terminated"
    );
    // The source runs, its ledger as before.
    assert_eq!(ask(&lab, "dc1.1-client", ip, &["Z"]).unwrap()[0], before[4]);
}
