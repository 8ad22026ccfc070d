//! The session and connectivity listings of the ops port.
//!
//! - `/api/v1/sessions`: this node's leaf sessions, paged and sortable (in the manner of NATS's `/connz`):
//!   `offset` (default 0), `limit` (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]), `sort` (`attached`,
//!   the default, oldest first; `peer`; `pending`, `pushed`, `acked`, largest first). Each session shows its
//!   peer, whether it claims presence, when it attached, its source address, the messages pushed into it,
//!   acknowledged and waiting, and its peer's NAT class as published.
//! - `/api/v1/connectivity`: the whole cluster as this node's replica sees it: attached sessions per super
//!   peer, peers online by NAT class, and the connections this node brokered by plan. The presence table is
//!   scanned at most once per [`CONNECTIVITY_TTL`], whatever the number of viewers.
//!
//! Neither shows tokens, message payloads, record keys or values.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::command::PresenceStatus;
use crate::sessions::{SessionEntry, SessionView};
use crate::store::state_machine::StateReader;
use crate::store::StoreError;

/// Sessions per page when the query names no limit.
pub const DEFAULT_LIMIT: usize = 100;
/// The most sessions one page holds.
pub const MAX_LIMIT: usize = 1000;
/// How long one scan of the presence table is reused.
pub const CONNECTIVITY_TTL: Duration = Duration::from_secs(5);

/// How a page of sessions is ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SortBy {
    /// Oldest attach first.
    #[default]
    Attached,
    /// By peer id.
    Peer,
    /// Most messages waiting for an acknowledgement first.
    Pending,
    /// Most messages pushed first.
    Pushed,
    /// Most messages acknowledged first.
    Acked,
}

/// The query of `/api/v1/sessions`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    #[serde(default)]
    pub offset: usize,
    pub limit: Option<usize>,
    #[serde(default)]
    pub sort: SortBy,
}

/// One page of sessions.
#[derive(Debug, Serialize)]
pub struct SessionsPage {
    /// Sessions on this node in all.
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub sort: SortBy,
    pub sessions: Vec<SessionView>,
}

/// A session row with its peer's presence as this node's replica has it.
#[derive(Debug, Serialize)]
pub struct SessionRow {
    #[serde(flatten)]
    pub session: SessionView,
    /// The NAT class the peer published ("" before it published any, or for a session without presence).
    pub nat_class: String,
}

/// Sorts `sessions` and cuts the page `query` asks for; an error names the bad parameter. Ties are broken by
/// session id, so pages do not overlap or skip while the set is unchanged. Only the sessions up to the page's
/// end are ordered (a selection, then a sort of those), and only the page is formatted.
pub fn page(sessions: Vec<SessionEntry>, query: &SessionsQuery) -> Result<SessionsPage, String> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(format!(
            "limit must be between 1 and {MAX_LIMIT} (got {limit})"
        ));
    }
    let total = sessions.len();
    let end = query.offset.saturating_add(limit).min(total);
    let rows = match query.sort {
        SortBy::Attached => cut(sessions, |entry| entry.attached_at_ms, query.offset, end),
        // The only order that needs text: peer ids sort as they read.
        SortBy::Peer => cut(sessions, |entry| entry.peer.to_string(), query.offset, end),
        SortBy::Pending => cut(
            sessions,
            |entry| u64::MAX - entry.pending,
            query.offset,
            end,
        ),
        SortBy::Pushed => cut(sessions, |entry| u64::MAX - entry.pushed, query.offset, end),
        SortBy::Acked => cut(sessions, |entry| u64::MAX - entry.acked, query.offset, end),
    };
    let sessions = rows.iter().map(SessionEntry::view).collect();
    Ok(SessionsPage {
        total,
        offset: query.offset,
        limit,
        sort: query.sort,
        sessions,
    })
}

/// The entries at positions `offset..end` in the order of (`key`, session id).
fn cut<K: Ord>(
    sessions: Vec<SessionEntry>,
    key: impl Fn(&SessionEntry) -> K,
    offset: usize,
    end: usize,
) -> Vec<SessionEntry> {
    if offset >= end {
        return Vec::new();
    }
    let mut keyed: Vec<((K, u64), SessionEntry)> = sessions
        .into_iter()
        .map(|entry| ((key(&entry), entry.id), entry))
        .collect();
    // Keys are unique (the session id is), so unstable orders are exact.
    if end < keyed.len() {
        keyed.select_nth_unstable_by(end - 1, |a, b| a.0.cmp(&b.0));
        keyed.truncate(end);
    }
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    keyed.drain(offset..).map(|(_, entry)| entry).collect()
}

/// The cluster's connectivity as one scan of the presence table finds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Census {
    /// Attached sessions by the node id of the super peer they are on.
    pub sessions_by_node: BTreeMap<u64, u64>,
    /// Online peers by the NAT class they published ("unknown" before they published any).
    pub peers_by_nat_class: BTreeMap<String, u64>,
    /// Peers online in all.
    pub peers_online: u64,
}

impl Census {
    /// Counts one presence entry: its sessions per host and, when online, its NAT class.
    pub fn add(&mut self, entry: &crate::command::PresenceEntry) {
        if entry.status == PresenceStatus::Offline {
            return;
        }
        self.peers_online += 1;
        let class = if entry.nat_class.is_empty() {
            "unknown"
        } else {
            entry.nat_class.as_str()
        };
        match self.peers_by_nat_class.get_mut(class) {
            Some(count) => *count += 1,
            None => {
                self.peers_by_nat_class.insert(class.to_string(), 1);
            }
        }
        for attached in &entry.sessions {
            *self.sessions_by_node.entry(attached.host).or_default() += 1;
        }
    }
}

/// The last census, taken again at most once per [`CONNECTIVITY_TTL`].
#[derive(Default)]
pub struct CensusCache {
    last: tokio::sync::Mutex<Option<(Instant, Arc<Census>)>>,
}

impl CensusCache {
    /// The census of the presence table in `db`, reusing one younger than the TTL. The scan runs on the
    /// blocking pool.
    pub async fn get(&self, reader: StateReader) -> Result<Arc<Census>, StoreError> {
        let mut last = self.last.lock().await;
        if let Some((at, census)) = last.as_ref() {
            if at.elapsed() < CONNECTIVITY_TTL {
                return Ok(census.clone());
            }
        }
        let census = crate::store::blocking(move || {
            let mut census = Census::default();
            crate::store::presence::for_each(reader.db(), |entry| census.add(entry))?;
            Ok(census)
        })
        .await?;
        let census = Arc::new(census);
        *last = Some((Instant::now(), census.clone()));
        Ok(census)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{AttachedSession, PresenceEntry};

    /// Three peer ids, in the order their text sorts.
    fn peers() -> Vec<vesper_proto::PeerId> {
        let mut peers: Vec<vesper_proto::PeerId> = [7u8, 99, 200]
            .iter()
            .map(|byte| vesper_proto::PeerId::from_public_key_bytes(&[*byte; 32]).unwrap())
            .collect();
        peers.sort_by_key(|peer| peer.to_string());
        peers
    }

    /// A session of peer `peer` ("a", "b" or "c": the first, second or third of [`peers`]).
    fn view(session: u64, peer: &str, attached_at_ms: u64, pending: u64) -> SessionEntry {
        let index = usize::from(peer.as_bytes()[0] - b'a');
        SessionEntry {
            id: session,
            peer: peers()[index],
            listed: true,
            attached_at_ms,
            remote: None,
            pushed: pending * 10,
            acked: pending * 10 - pending,
            pending,
        }
    }

    fn ids(page: &SessionsPage) -> Vec<u64> {
        page.sessions
            .iter()
            .map(|view| u64::from_str_radix(&view.session, 16).unwrap())
            .collect()
    }

    #[test]
    fn pages_are_sorted_cut_and_bounded() {
        let all = vec![
            view(1, "c", 30, 1),
            view(2, "a", 10, 5),
            view(3, "b", 20, 0),
            view(4, "a", 10, 5),
        ];
        let query = |offset, limit, sort| SessionsQuery {
            offset,
            limit,
            sort,
        };
        let cases = [
            (query(0, None, SortBy::Attached), vec![2, 4, 3, 1]),
            (query(1, Some(2), SortBy::Attached), vec![4, 3]),
            (query(0, None, SortBy::Peer), vec![2, 4, 3, 1]),
            (query(0, None, SortBy::Pending), vec![2, 4, 1, 3]),
            (query(0, Some(1), SortBy::Pushed), vec![2]),
            (query(3, Some(5), SortBy::Acked), vec![3]),
            (query(9, None, SortBy::Attached), vec![]),
        ];
        for (query, expected) in cases {
            let page = page(all.clone(), &query).unwrap();
            assert_eq!(ids(&page), expected, "{query:?}");
            assert_eq!(page.total, 4);
        }
        for limit in [0, MAX_LIMIT + 1] {
            let error = page(all.clone(), &query(0, Some(limit), SortBy::Attached)).unwrap_err();
            assert!(
                error.contains("limit must be between 1 and 1000"),
                "{error}"
            );
        }
        assert_eq!(
            page(all, &query(0, None, SortBy::Attached)).unwrap().limit,
            DEFAULT_LIMIT
        );
    }

    proptest::proptest! {
        /// A page is exactly the slice of the fully sorted list, for every sort, offset and limit.
        #[test]
        fn a_page_is_the_slice_of_the_full_order(
            rows in proptest::collection::vec((0u64..5, 0u64..4, 0u8..3), 0..40),
            offset in 0usize..45,
            limit in 1usize..12,
            sort in 0usize..5,
        ) {
            let sort = [SortBy::Attached, SortBy::Peer, SortBy::Pending, SortBy::Pushed, SortBy::Acked][sort];
            let all: Vec<SessionEntry> = rows
                .iter()
                .enumerate()
                .map(|(n, (at, pending, peer))| {
                    view(n as u64 * 7919 % 1000, ["a", "b", "c"][usize::from(*peer)], *at, *pending + 1)
                })
                .collect();
            let mut unique: Vec<u64> = all.iter().map(|entry| entry.id).collect();
            unique.sort();
            unique.dedup();
            proptest::prop_assume!(unique.len() == all.len());
            let mut expected = all.clone();
            expected.sort_by_key(|entry| {
                let key = match sort {
                    SortBy::Attached => (entry.attached_at_ms, String::new()),
                    SortBy::Peer => (0, entry.peer.to_string()),
                    SortBy::Pending => (u64::MAX - entry.pending, String::new()),
                    SortBy::Pushed => (u64::MAX - entry.pushed, String::new()),
                    SortBy::Acked => (u64::MAX - entry.acked, String::new()),
                };
                (key, entry.id)
            });
            let expected: Vec<u64> = expected.iter().skip(offset).take(limit).map(|entry| entry.id).collect();
            let got = page(all, &SessionsQuery { offset, limit: Some(limit), sort }).unwrap();
            proptest::prop_assert_eq!(ids(&got), expected);
        }
    }

    #[test]
    fn unknown_sorts_and_parameters_are_refused() {
        let parse = |text: &str| serde_json::from_str::<SessionsQuery>(text);
        assert_eq!(
            parse(r#"{"sort":"pending"}"#).unwrap().sort,
            SortBy::Pending
        );
        assert!(parse(r#"{"sort":"bytes"}"#).is_err());
        assert!(parse(r#"{"page":2}"#).is_err());
    }

    #[test]
    fn the_census_counts_online_peers_and_their_sessions() {
        let entry = |status, nat_class: &str, hosts: &[u64]| PresenceEntry {
            status,
            note: String::new(),
            sessions: hosts
                .iter()
                .enumerate()
                .map(|(n, host)| AttachedSession {
                    host: *host,
                    session: n as u64 + 1,
                    attached_at_ms: 0,
                })
                .collect(),
            superseded: Vec::new(),
            candidates: Vec::new(),
            nat_class: nat_class.into(),
            changed_at_ms: 0,
            attributes: BTreeMap::new(),
        };
        let entries = [
            entry(PresenceStatus::Online, "public", &[1]),
            entry(PresenceStatus::Away, "endpoint-dependent", &[1, 2]),
            entry(PresenceStatus::Online, "", &[2]),
            entry(PresenceStatus::Offline, "public", &[]),
        ];
        let mut census = Census::default();
        entries.iter().for_each(|entry| census.add(entry));
        assert_eq!(census.peers_online, 3);
        assert_eq!(census.sessions_by_node, BTreeMap::from([(1, 2), (2, 2)]));
        assert_eq!(
            census.peers_by_nat_class,
            BTreeMap::from([
                ("endpoint-dependent".to_string(), 1),
                ("public".to_string(), 1),
                ("unknown".to_string(), 1),
            ])
        );
    }
}
