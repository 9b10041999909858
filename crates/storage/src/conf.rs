//! One host's `ceph.conf` for one cluster: the cluster's global settings and a section for
//! each daemon of that host, every path under the host's cluster directory (nothing in
//! `/etc/ceph` or `/var/lib/ceph`, so that a lab's hosts, which share one filesystem, and a
//! real host's other services never meet). Settings marked (NOTES) were verified on this
//! machine kind (`../shared/NOTES.md`, "Ceph").

use std::fmt::Write;
use std::path::Path;

use crate::plan::{ClusterPlan, Kind};

/// `ceph.conf` for `host`'s daemons and clients of `plan`, whose files are under `dir`.
pub fn render(plan: &ClusterPlan, host: &str, dir: &Path) -> String {
    let d = dir.display();
    let mut c = String::new();
    let initial: Vec<&str> = plan.mons.iter().map(|m| m.id.as_str()).collect();
    let _ = write!(
        c,
        "[global]
fsid = {fsid}
mon_host = {mon_host}
mon_initial_members = {initial}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
# OSD and manager ports stay below the host agent's 7070.
ms_bind_port_min = 6800
ms_bind_port_max = 7000
osd_pool_default_size = {size}
osd_pool_default_min_size = {min_size}
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
# No PG splits while a benchmark runs.
osd_pool_default_pg_autoscale_mode = off
# (NOTES) the default 250 refuses radosgw's ninth pool.
mon_max_pg_per_osd = 1000
# (NOTES) a lab host's filesystem is shared and may be fuller than 30 %.
mon_data_avail_warn = 5
mon_data_avail_crit = 2
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
{single}# A site's loss is seen in about 10 s (defaults: 20 s grace, 2 reporters).
osd_heartbeat_interval = 2
osd_heartbeat_grace = 8
mon_osd_adjust_heartbeat_grace = false
mon_osd_min_down_reporters = 1
# A site's monitors lost: the others call an election when the leader's lease lapses
# (lease x 2), an election round lasts up to mon_election_timeout, and entering degraded
# stretch mode is one more. Measured with DC1.1 cut off under writes (`bench storage`):
# writes stopped 24.9 s with the defaults (5 s, 5 s), 16.0 s with 3 s and 3 s.
mon_lease = 3
mon_election_timeout = 3
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
log_to_stderr = false
err_to_stderr = true

[mon]
auth_allow_insecure_global_id_reclaim = false
# A map change (a snapshot's id, a pool) is proposed 0.1 s after the last commit, not
# 1 s: `rbd snap create` took 1.0 s with the default and 0.2 s with 0.1 on the lab's
# stretched cluster, 1.0 s and 0.1 s on the cloud's (every export and backup takes one).
paxos_propose_interval = 0.1
# After a quiet spell, 0.01 s, not 0.05: `rbd snap create` 0.14 s -> 0.10 s on the
# stretched cluster, 0.09 s -> 0.06 s on the cloud's.
paxos_min_wait = 0.01
{election}
mgr_initial_modules = iostat

[osd]
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = {block}
# (NOTES) default 4 GiB per OSD.
osd_memory_target = 1073741824
# A lab's block file sits on a disk Linux calls rotational: flash tunings, no recovery
# sleep (stretch mode wants flash).
bluestore_debug_enforce_settings = ssd
osd_recovery_sleep_hdd = 0

[client]
keyring = {d}/keyring.client.vm
admin_socket = {d}/run/$name.$pid.asok
log_file = {d}/log/$name.$pid.log

[client.admin]
keyring = {d}/keyring.client.admin
",
        fsid = plan.fsid,
        mon_host = plan.mon_host(),
        initial = initial.join(","),
        size = plan.pool.size,
        min_size = plan.pool.min_size,
        block = u64::from(plan.osd_gib) << 30,
        // One OSD (a cloud's own cluster): one copy, chosen among OSDs, not hosts, and
        // Pacific refuses size-1 pools unless told (as vstart.sh does).
        single = if plan.osds.len() == 1 {
            "mon_allow_pool_size_one = true\nosd_crush_chooseleaf_type = 0\n"
        } else {
            ""
        },
        election = if plan.stretch.is_some() {
            "# Stretch mode's elections (connectivity) from the start: one election fewer.\nmon_election_default_strategy = 3\n"
        } else {
            ""
        },
    );
    for m in plan.on_host(Kind::Mon, host) {
        let _ = write!(
            c,
            "\n[mon.{id}]\nmon_data = {d}/mon.{id}\npublic_addr = {ip}\nkeyring = {d}/keyring.mon\n",
            id = m.id,
            ip = m.ip
        );
    }
    for m in plan.on_host(Kind::Mgr, host) {
        // (NOTES) each daemon its own keyring, or ceph-mgr cannot fetch its config.
        let _ = write!(
            c,
            "\n[mgr.{id}]\nmgr_data = {d}/mgr.{id}\npublic_addr = {ip}\nkeyring = {d}/keyring.mgr.{id}\n",
            id = m.id,
            ip = m.ip
        );
    }
    for o in plan.on_host(Kind::Osd, host) {
        // (NOTES) the block file outside the OSD's data directory.
        let _ = write!(
            c,
            "\n[osd.{id}]\nosd_data = {d}/osd.{id}\npublic_addr = {ip}\ncluster_addr = {ip}\n\
             keyring = {d}/osd.{id}/keyring\nbluestore_block_path = {d}/blocks/osd.{id}.block\n\
             crush_location = root=default datacenter={site} host={host}\n",
            id = o.id,
            ip = o.ip,
            site = o.site,
            host = o.host,
        );
    }
    for g in plan.on_host(Kind::Rgw, host) {
        // Path-style buckets only (no `rgw_dns_name`), on the host's address.
        let _ = write!(
            c,
            "\n[client.rgw.{id}]\nkeyring = {d}/keyring.client.rgw.{id}\n\
             rgw_frontends = beast endpoint={ip}:{port}\nrgw_data = {d}/rgw.{id}\n\
             log_file = {d}/log/$name.log\nadmin_socket = {d}/run/$name.asok\n\
             # A deleted object's data is freed by the gateway's garbage collector, by default\n\
             # 2 h later at the earliest: a day of migrations (each image deleted after its\n\
             # run) held 2.1 GiB of the cloud's 8 GiB OSD.\n\
             rgw_gc_obj_min_wait = 300\nrgw_gc_processor_period = 300\n",
            id = g.id,
            ip = g.ip,
            port = crate::plan::RGW_PORT,
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_gets_sections_for_its_own_daemons_only() {
        let mut plan = crate::plan::clusters(&dczone_zone::Zone::reference())[0].clone();
        plan.fsid = "f".into();
        let text = render(&plan, "dc1.2-h1", Path::new("/x/r1"));
        assert!(text.contains("[mon.c]\nmon_data = /x/r1/mon.c\npublic_addr = 10.77.2.11\n"));
        assert!(text.contains("[osd.2]"));
        assert!(text.contains("crush_location = root=default datacenter=dc1.2 host=dc1.2-h1"));
        assert!(text.contains("[mgr.y]"));
        assert!(!text.contains("[mon.a]"));
        assert!(text.contains("osd_pool_default_size = 4\n"));
        assert!(text.contains("mon_host = [v2:10.77.1.11:3300,v1:10.77.1.11:6789],"));
        assert!(text.contains("bluestore_block_size = 6442450944\n"));
    }
}
