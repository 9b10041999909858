//! The guarded manual failover (`dczone db failover --to SITE [--accept-data-loss]`), for
//! when consensus itself is lost and the HA agents cannot act. Patroni's `failover` and
//! Data Guard's `FAILOVER TO` are the models: without the flag it goes ahead only if it can
//! prove the target holds every acknowledged commit; with it, it says exactly what may be
//! lost.
//!
//! The proof does not trust the consensus store (it has no quorum, and a surviving member's
//! copy may miss the last committed writes). It compares WAL: every commit a primary ever
//! acknowledged lies before the end of its WAL, and WAL is a prefix, so a target whose WAL
//! reaches the end of every other member's WAL holds every acknowledged commit. A member
//! whose WAL end cannot be read (its site unreachable) leaves the proof open.

use serde::Serialize;

/// How far one member's WAL reaches, and how it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalEnd {
    pub site: String,
    /// None: the member could not be read (unreachable).
    pub lsn: Option<u64>,
    /// The next transaction id as of that WAL end (xids assigned before it).
    pub next_xid: Option<u64>,
    /// Commit records at or after the target's WAL end, where they were counted (a stopped
    /// member's WAL read with pg_waldump).
    pub commits_after_target: Option<u64>,
    /// "online" (a running server), "offline" (read from its stopped data directory),
    /// or "unreachable".
    pub source: String,
}

/// What the failover may cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exposure {
    /// The target's WAL end: commits before it are kept.
    pub from_lsn: u64,
    /// The furthest WAL end read elsewhere (None if no other member could be read).
    pub to_lsn: Option<u64>,
    /// Commits counted in the WAL between the two, or else the transaction ids assigned
    /// between them (an upper bound); None if neither is known.
    pub transactions_at_most: Option<u64>,
    /// Members whose WAL end is unknown: anything they acknowledged after `from_lsn` may be
    /// lost too.
    pub unknown: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The target's WAL reaches every other member's: nothing acknowledged can be lost.
    Proven,
    /// Not proven, and the operator accepted the loss.
    DataLossAccepted(Exposure),
    /// Not proven: why, naming the gap, and what the operator can do.
    Refused(String),
}

pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Decides a manual failover to `target` given every other member's WAL end.
pub fn verdict(target: &WalEnd, others: &[WalEnd], accept_data_loss: bool) -> Verdict {
    let Some(t) = target.lsn else {
        return Verdict::Refused(format!(
            "{} cannot be read: a failover needs a running standby as its target",
            target.site
        ));
    };
    let ahead: Vec<&WalEnd> = others
        .iter()
        .filter(|o| o.lsn.is_some_and(|l| l > t))
        .collect();
    let unknown: Vec<String> = others
        .iter()
        .filter(|o| o.lsn.is_none())
        .map(|o| o.site.clone())
        .collect();
    if ahead.is_empty() && unknown.is_empty() {
        return Verdict::Proven;
    }
    let furthest = ahead.iter().max_by_key(|o| o.lsn);
    let to_lsn = furthest.and_then(|o| o.lsn);
    let transactions_at_most = furthest.and_then(|o| {
        o.commits_after_target.or_else(|| {
            o.next_xid
                .zip(target.next_xid)
                .map(|(o, t)| o.saturating_sub(t))
        })
    });
    if accept_data_loss {
        return Verdict::DataLossAccepted(Exposure {
            from_lsn: t,
            to_lsn,
            transactions_at_most,
            unknown,
        });
    }
    let mut why = Vec::new();
    if let Some(f) = furthest {
        let l = f.lsn.unwrap_or(t);
        why.push(format!(
            "{} holds WAL up to {} but {} only up to {}: {} bytes{} behind; fail over to {} \
             instead",
            f.site,
            lsn_text(l),
            target.site,
            lsn_text(t),
            l - t,
            transactions_at_most
                .map(|n| format!(", at most {n} transactions"))
                .unwrap_or_default(),
            f.site
        ));
    }
    if !unknown.is_empty() {
        why.push(format!(
            "{} cannot be reached, so what {} acknowledged after {}'s WAL end {} is unknown",
            unknown.join(", "),
            if unknown.len() == 1 { "it" } else { "they" },
            target.site,
            lsn_text(t)
        ));
    }
    Verdict::Refused(format!(
        "cannot prove that {} holds every acknowledged commit: {}. Pass --accept-data-loss \
         to fail over anyway",
        target.site,
        why.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(site: &str, lsn: Option<u64>, xid: Option<u64>) -> WalEnd {
        WalEnd {
            site: site.into(),
            lsn,
            next_xid: xid,
            commits_after_target: None,
            source: if lsn.is_some() {
                "online"
            } else {
                "unreachable"
            }
            .into(),
        }
    }

    #[test]
    fn a_target_at_or_past_every_wal_end_is_proven() {
        let t = end("dc1.2", Some(100), Some(9));
        let others = [
            end("dc1.1", Some(100), Some(9)),
            end("dc2.1", Some(80), None),
        ];
        assert_eq!(verdict(&t, &others, false), Verdict::Proven);
    }

    #[test]
    fn a_target_that_is_behind_is_refused_naming_the_gap_and_the_better_target() {
        let t = end("dc1.2", Some(0x100), Some(10));
        let others = [end("dc1.1", Some(0x180), Some(14))];
        let Verdict::Refused(why) = verdict(&t, &others, false) else {
            panic!("expected a refusal");
        };
        assert!(why.contains("dc1.1 holds WAL up to 0/180"), "{why}");
        assert!(why.contains("128 bytes, at most 4 transactions"), "{why}");
        assert!(why.contains("fail over to dc1.1"), "{why}");
        assert!(why.contains("--accept-data-loss"), "{why}");
    }

    #[test]
    fn an_unreachable_member_leaves_the_proof_open_and_the_flag_reports_the_exposure() {
        let t = end("dc2.1", Some(0x500), Some(40));
        let others = [
            end("dc1.1", None, None),
            end("dc1.2", Some(0x400), Some(30)),
        ];
        let Verdict::Refused(why) = verdict(&t, &others, false) else {
            panic!("expected a refusal");
        };
        assert!(why.contains("dc1.1 cannot be reached"), "{why}");
        assert_eq!(
            verdict(&t, &others, true),
            Verdict::DataLossAccepted(Exposure {
                from_lsn: 0x500,
                to_lsn: None,
                transactions_at_most: None,
                unknown: vec!["dc1.1".into()],
            })
        );
    }

    #[test]
    fn a_target_that_cannot_be_read_is_refused_even_with_the_flag() {
        let t = end("dc2.1", None, None);
        assert!(matches!(verdict(&t, &[], true), Verdict::Refused(_)));
    }
}
