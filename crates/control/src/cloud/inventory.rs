//! What the account holds in the cloud, and its removal: instances, images, security
//! groups, objects, and multipart uploads never completed. A failed migration leaves some
//! of these behind (an object, an image, a group, an upload a lost path could not abort);
//! each is listed with what uses it, and removed by id through the cloud's own API.

use anyhow::{anyhow, Context};
use dczone_cloud::client::{Compute, GroupInfo, ImageInfo, InstanceInfo};
use dczone_cloud::s3::{Object, PendingUpload, Store};
use dczone_cloud::Account;
use serde::Serialize;

/// An image and the instances (not terminated) whose disk is a clone of it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    #[serde(flatten)]
    pub image: ImageInfo,
    pub used_by: Vec<String>,
}

/// A security group and the instances (not terminated) in it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupRow {
    #[serde(flatten)]
    pub group: GroupInfo,
    pub used_by: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub instances: Vec<InstanceInfo>,
    pub images: Vec<ImageRow>,
    pub groups: Vec<GroupRow>,
    pub objects: Vec<Object>,
    /// Multipart uploads begun and neither completed nor aborted: their parts take the
    /// store's space until `abort-upload`.
    pub uploads: Vec<PendingUpload>,
}

/// Everything the account holds (one call of each list).
pub fn inventory(account: &Account) -> anyhow::Result<Inventory> {
    let c = Compute::new(account);
    let store = Store::new(account)?;
    let instances = c.describe_instances(&[])?;
    let users = |f: &dyn Fn(&InstanceInfo) -> bool| -> Vec<String> {
        instances
            .iter()
            .filter(|i| i.state != "terminated" && f(i))
            .map(|i| i.id.clone())
            .collect()
    };
    let images = c
        .describe_images()?
        .into_iter()
        .map(|image| ImageRow {
            used_by: users(&|i| i.image_id == image.id),
            image,
        })
        .collect();
    let groups = c
        .describe_security_groups()?
        .into_iter()
        .map(|group| GroupRow {
            used_by: users(&|i| i.groups.contains(&group.id)),
            group,
        })
        .collect();
    Ok(Inventory {
        images,
        groups,
        objects: store.list()?,
        uploads: store.uploads()?,
        instances,
    })
}

/// Removes what a migration made in the cloud: its instance, image, security group and
/// object, each tried whatever the others did; what could not be removed, with why.
pub fn remove_migrated(account: &Account, m: &super::VmReport) -> Vec<String> {
    let c = Compute::new(account);
    let mut failed = Vec::new();
    let mut note = |what: String, r: anyhow::Result<()>| {
        if let Err(e) = r {
            failed.push(format!("{what}: {e:#}"));
        }
    };
    note(
        format!("terminate {}", m.instance),
        c.terminate(std::slice::from_ref(&m.instance))
            .map_err(Into::into),
    );
    note(
        format!("deregister {}", m.image),
        c.deregister_image(&m.image).map_err(Into::into),
    );
    if let Some(g) = &m.security_group_made {
        note(
            format!("delete security group {g}"),
            c.delete_security_group(g).map_err(Into::into),
        );
    }
    note(
        format!("delete object {}", m.object),
        Store::new(account)
            .and_then(|s| s.delete(&m.object))
            .map_err(Into::into),
    );
    failed
}

pub fn terminate(account: &Account, ids: &[String]) -> anyhow::Result<()> {
    Ok(Compute::new(account).terminate(ids)?)
}

pub fn deregister(account: &Account, images: &[String]) -> anyhow::Result<()> {
    let c = Compute::new(account);
    for id in images {
        c.deregister_image(id)
            .with_context(|| format!("deregister image {id}"))?;
    }
    Ok(())
}

pub fn delete_groups(account: &Account, groups: &[String]) -> anyhow::Result<()> {
    let c = Compute::new(account);
    for id in groups {
        c.delete_security_group(id)
            .with_context(|| format!("delete security group {id}"))?;
    }
    Ok(())
}

pub fn delete_objects(account: &Account, keys: &[String]) -> anyhow::Result<()> {
    let store = Store::new(account)?;
    for k in keys {
        store.delete(k)?;
    }
    Ok(())
}

/// Aborts uploads by their id (each one's object key is looked up in the listing).
pub fn abort_uploads(account: &Account, upload_ids: &[String]) -> anyhow::Result<()> {
    let store = Store::new(account)?;
    let pending = store.uploads()?;
    for id in upload_ids {
        let u = pending.iter().find(|u| &u.upload_id == id).ok_or_else(|| {
            anyhow!(
                "no upload {id} in progress in bucket {} (`dczone cloud list` shows them)",
                account.bucket
            )
        })?;
        store.abort(&u.key, id)?;
    }
    Ok(())
}
