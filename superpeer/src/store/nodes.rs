//! The node table as stored in RocksDB: super peers by node id (tombstones included), their relay loads, and
//! revoked certificates. They share one column family so that snapshots carry all of them (with the namespace
//! ACLs of [`super::records`], which live there too).
//!
//! ```text
//! nodes:   node id (8, BE)                -> postcard(NodeEntry)
//! nodes:   node id (8, BE) 'L'            -> postcard(RelayLoad)     the node's last relay load report
//! nodes:   node id (8, BE) 'S'            -> postcard(LeafLoad)      the node's last leaf session count
//! nodes:   "revoked/" SHA-256 (32)        -> postcard(u64)           when the certificate was revoked
//! nodes:   "placement/targets"            -> postcard(PlacementTargets)  the controller's targets
//! nodes:   "placement/journal/" seq (8, BE) -> postcard(JournalEntry)  its last JOURNAL_KEPT actions
//! nodes:   "placement/candidate/" peer (32) -> postcard(CandidateEntry) nodes that offer to serve
//! nodes:   "placement/grant/" peer (32)    -> ()                     eligibility granted to that peer
//! nodes:   "placement/grant-all"           -> ()                     eligibility granted to every candidate
//! nodes:   "placement/zone/" node id (8, BE) -> postcard(String)     a super peer's zone label
//! nodes:   "placement/cert/" node id (8, BE) -> postcard([u8; 32])   SHA-256 of the certificate it presents
//! nodes:   "placement/score/" node id (8, BE) -> postcard(MemberScore) an adopted super peer's score
//! nodes:   "placement/rtt/" peer (32)      -> postcard(u32)          a candidate's proved round trip (us)
//! nodes:   "placement/adoption"            -> postcard(Adoption)      the candidate being adopted, if any
//! nodes:   "placement/issuer/" node id (8, BE) -> postcard(u64)      a super peer holds an issuer until then
//! nodes:   "placement/issued/" peer (32) SHA-256 (32) -> postcard(u64)  a certificate issued to that key, and
//!                                                                    until when it is valid
//! sm_meta: "next_node_id"                 -> postcard(u64)           the next id to allocate
//! ```

use std::collections::BTreeMap;

use rocksdb::{IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use super::{cf, decode, encode, Applied, Apply, StoreError, CF_NODES, CF_SM_META};
use crate::command::{
    self, Adoption, Candidate, CandidateEntry, GrantEligibility, IssueCertificate, MemberScore,
    NodeCertificate, NodeInfo, NodeIssuer, NodeZone, PeerKey, PlacementJournal, PlacementTargets,
    RecordIssued, RegisterNode, Rejection, Response, RevokeCertificate, SetAdoption, SetPlacement,
    TombstoneNode,
};

/// Key of the next node id in `sm_meta`.
pub(super) const NEXT_NODE_ID_KEY: &[u8] = b"next_node_id";

/// A super peer as the node table keeps it. Removed nodes stay as tombstones so their ids are never reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub info: NodeInfo,
    pub removed: bool,
}

/// A node's last relay load report. Kept in the node table under the node's key plus [`RELAY_LOAD_SUFFIX`],
/// so snapshots carry it with the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLoad {
    pub active: u32,
    pub capacity: u32,
    pub at_ms: u64,
}

impl RelayLoad {
    /// Share of the capacity in use; a node that does not relay is full.
    pub fn fill(&self) -> f64 {
        if self.capacity == 0 {
            f64::INFINITY
        } else {
            f64::from(self.active) / f64::from(self.capacity)
        }
    }
}

/// A node's last report of its leaf sessions, kept like [`RelayLoad`] under [`LEAF_LOAD_SUFFIX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafLoad {
    pub sessions: u32,
    pub at_ms: u64,
}

/// Suffix of a relay load key in the node table (node keys are the 8-byte big-endian id alone).
const RELAY_LOAD_SUFFIX: u8 = b'L';
/// Suffix of a leaf load key.
const LEAF_LOAD_SUFFIX: u8 = b'S';

fn load_key(node_id: u64, suffix: u8) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&node_id.to_be_bytes());
    key[8] = suffix;
    key
}

/// Whether `key` is a load report with this suffix. A namespace ACL key can also be 9 bytes long and end in
/// the same letter (`acl/abcdL`), so the ACL prefix is ruled out too; other text keys are longer.
fn is_load_key(key: &[u8], suffix: u8) -> bool {
    key.len() == 9 && key[8] == suffix && !key.starts_with(super::records::ACL_PREFIX)
}

/// Revocations live in the node table (so snapshots carry them) under this prefix and the certificate's
/// SHA-256; node entries have 8-byte keys and relay loads 9-byte ones.
const REVOKED_PREFIX: &[u8; 8] = b"revoked/";

fn revoked_key(fingerprint: &[u8; 32]) -> Vec<u8> {
    [REVOKED_PREFIX.as_slice(), fingerprint].concat()
}

/// The placement controller's state in the node table (so snapshots carry it) lives under this prefix.
const PLACEMENT_PREFIX: &[u8] = b"placement/";
const TARGETS_KEY: &[u8] = b"placement/targets";
const JOURNAL_PREFIX: &[u8] = b"placement/journal/";
/// Journal entries kept; older ones are deleted as new ones come.
pub const JOURNAL_KEPT: u64 = 100;

const CANDIDATE_PREFIX: &[u8] = b"placement/candidate/";
const GRANT_PREFIX: &[u8] = b"placement/grant/";
const GRANT_ALL_KEY: &[u8] = b"placement/grant-all";
const ZONE_PREFIX: &[u8] = b"placement/zone/";
const CERT_PREFIX: &[u8] = b"placement/cert/";
const SCORE_PREFIX: &[u8] = b"placement/score/";
const RTT_PREFIX: &[u8] = b"placement/rtt/";

fn rtt_key(peer: &PeerKey) -> Vec<u8> {
    [RTT_PREFIX, peer.as_slice()].concat()
}

/// A candidate's last stored round trip to the voters, in microseconds.
pub fn read_candidate_rtt(db: &DB, peer: &PeerKey) -> Result<Option<u32>, StoreError> {
    db.get_pinned_cf(cf(db, CF_NODES), rtt_key(peer))?
        .map(|bytes| decode("candidate round trip", &bytes))
        .transpose()
}
const ADOPTION_KEY: &[u8] = b"placement/adoption";
const ISSUER_PREFIX: &[u8] = b"placement/issuer/";
const ISSUED_PREFIX: &[u8] = b"placement/issued/";

fn issued_key(peer: &PeerKey, fingerprint: &[u8; 32]) -> Vec<u8> {
    [ISSUED_PREFIX, peer.as_slice(), fingerprint.as_slice()].concat()
}

/// The certificates issued to the key `peer` that have not been pruned: fingerprint and end of validity.
pub fn read_issued(db: &DB, peer: &PeerKey) -> Result<Vec<([u8; 32], u64)>, StoreError> {
    let prefix = [ISSUED_PREFIX, peer.as_slice()].concat();
    let mut issued = Vec::new();
    for item in scan(db, &prefix) {
        let (key, bytes) = item?;
        let fingerprint: [u8; 32] = key[prefix.len()..]
            .try_into()
            .map_err(|_| StoreError::Corrupt("issued key is not peer and fingerprint"))?;
        issued.push((fingerprint, decode("issued validity", &bytes)?));
    }
    Ok(issued)
}

/// The adoption that runs, if any.
pub fn read_adoption(db: &DB) -> Result<Option<Adoption>, StoreError> {
    db.get_pinned_cf(cf(db, CF_NODES), ADOPTION_KEY)?
        .map(|bytes| decode("adoption", &bytes))
        .transpose()
}

/// Until when each super peer that holds a certificate issuer holds it, by node id.
pub fn read_issuers(db: &DB) -> Result<BTreeMap<u64, u64>, StoreError> {
    let mut issuers = BTreeMap::new();
    for item in scan(db, ISSUER_PREFIX) {
        let (key, bytes) = item?;
        let id = u64::from_be_bytes(
            key[ISSUER_PREFIX.len()..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("issuer key is not 8 bytes of node id"))?,
        );
        issuers.insert(id, decode("issuer validity", &bytes)?);
    }
    Ok(issuers)
}

/// The certificate fingerprint every super peer reported, by node id.
pub fn read_node_certificates(db: &DB) -> Result<BTreeMap<u64, [u8; 32]>, StoreError> {
    let mut certificates = BTreeMap::new();
    for item in scan(db, CERT_PREFIX) {
        let (key, bytes) = item?;
        let id = u64::from_be_bytes(
            key[CERT_PREFIX.len()..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("certificate key is not 8 bytes of node id"))?,
        );
        certificates.insert(id, decode("certificate fingerprint", &bytes)?);
    }
    Ok(certificates)
}

fn zone_key(node_id: u64) -> Vec<u8> {
    [ZONE_PREFIX, &node_id.to_be_bytes()].concat()
}

/// The zone label of every super peer that reported one.
pub fn read_zones(db: &DB) -> Result<BTreeMap<u64, String>, StoreError> {
    let mut zones = BTreeMap::new();
    for item in scan(db, ZONE_PREFIX) {
        let (key, bytes) = item?;
        let id = u64::from_be_bytes(
            key[ZONE_PREFIX.len()..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("zone key is not 8 bytes of node id"))?,
        );
        zones.insert(id, decode("zone", &bytes)?);
    }
    Ok(zones)
}

fn score_key(node_id: u64) -> Vec<u8> {
    [SCORE_PREFIX, &node_id.to_be_bytes()].concat()
}

/// The score of every adopted super peer that has one.
pub fn read_node_scores(db: &DB) -> Result<BTreeMap<u64, MemberScore>, StoreError> {
    let mut scores = BTreeMap::new();
    for item in scan(db, SCORE_PREFIX) {
        let (key, bytes) = item?;
        let id = u64::from_be_bytes(
            key[SCORE_PREFIX.len()..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("score key is not 8 bytes of node id"))?,
        );
        scores.insert(id, decode("node score", &bytes)?);
    }
    Ok(scores)
}

fn candidate_key(peer: &PeerKey) -> Vec<u8> {
    [CANDIDATE_PREFIX, peer.as_slice()].concat()
}

fn grant_key(peer: &PeerKey) -> Vec<u8> {
    [GRANT_PREFIX, peer.as_slice()].concat()
}

/// A key and its value, as RocksDB iterators give them.
type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Keys under `prefix` in the node table, with their values.
fn scan<'a>(
    db: &'a DB,
    prefix: &'a [u8],
) -> impl Iterator<Item = Result<KeyValue, StoreError>> + 'a {
    let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
    db.iterator_cf(cf(db, CF_NODES), mode)
        .map(|item| item.map_err(StoreError::from))
        .take_while(move |item| {
            item.as_ref()
                .map_or(true, |(key, _)| key.starts_with(prefix))
        })
}

/// One candidate's entry.
pub fn read_candidate(db: &DB, peer: &PeerKey) -> Result<Option<CandidateEntry>, StoreError> {
    db.get_pinned_cf(cf(db, CF_NODES), candidate_key(peer))?
        .map(|bytes| decode("candidate entry", &bytes))
        .transpose()
}

/// Every candidate entry, by peer.
pub fn read_candidates(db: &DB) -> Result<BTreeMap<PeerKey, CandidateEntry>, StoreError> {
    let mut candidates = BTreeMap::new();
    for item in scan(db, CANDIDATE_PREFIX) {
        let (key, bytes) = item?;
        let peer: PeerKey = key[CANDIDATE_PREFIX.len()..]
            .try_into()
            .map_err(|_| StoreError::Corrupt("candidate key is not 32 bytes of peer"))?;
        candidates.insert(peer, decode("candidate entry", &bytes)?);
    }
    Ok(candidates)
}

/// Who is granted eligibility: everyone, and the peers granted one by one.
pub fn read_grants(db: &DB) -> Result<(bool, Vec<PeerKey>), StoreError> {
    let all = db.get_pinned_cf(cf(db, CF_NODES), GRANT_ALL_KEY)?.is_some();
    let mut peers = Vec::new();
    for item in scan(db, GRANT_PREFIX) {
        let (key, _) = item?;
        peers.push(
            key[GRANT_PREFIX.len()..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("grant key is not 32 bytes of peer"))?,
        );
    }
    Ok((all, peers))
}

/// Whether `peer` is granted eligibility.
pub fn is_granted(db: &DB, peer: &PeerKey) -> Result<bool, StoreError> {
    Ok(db.get_pinned_cf(cf(db, CF_NODES), GRANT_ALL_KEY)?.is_some()
        || db
            .get_pinned_cf(cf(db, CF_NODES), grant_key(peer))?
            .is_some())
}

fn journal_key(seq: u64) -> Vec<u8> {
    [JOURNAL_PREFIX, &seq.to_be_bytes()].concat()
}

/// One action of the placement controller, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Sequence number, from 1.
    pub seq: u64,
    /// When it was applied (the proposer's clock).
    pub at_ms: u64,
    pub entry: PlacementJournal,
}

/// The controller's targets: as an operator set them, or the defaults.
pub fn read_placement_targets(db: &DB) -> Result<PlacementTargets, StoreError> {
    Ok(db
        .get_pinned_cf(cf(db, CF_NODES), TARGETS_KEY)?
        .map(|bytes| decode("placement targets", &bytes))
        .transpose()?
        .unwrap_or_default())
}

/// The journal, oldest first.
pub fn read_placement_journal(db: &DB) -> Result<Vec<JournalEntry>, StoreError> {
    scan(db, JOURNAL_PREFIX)
        .map(|item| decode("placement journal entry", &item?.1))
        .collect()
}

/// Whether the certificate with this SHA-256 was revoked (as of the applied state).
pub fn is_revoked(db: &DB, fingerprint: &[u8; 32]) -> Result<bool, StoreError> {
    Ok(db
        .get_pinned_cf(cf(db, CF_NODES), revoked_key(fingerprint))?
        .is_some())
}

/// The last relay load report of every node that made one.
pub fn read_relay_loads(db: &DB) -> Result<BTreeMap<u64, RelayLoad>, StoreError> {
    read_loads(db, RELAY_LOAD_SUFFIX, "relay load")
}

/// The last leaf load report of every node that made one.
pub fn read_leaf_loads(db: &DB) -> Result<BTreeMap<u64, LeafLoad>, StoreError> {
    read_loads(db, LEAF_LOAD_SUFFIX, "leaf load")
}

fn read_loads<T: serde::de::DeserializeOwned>(
    db: &DB,
    suffix: u8,
    what: &'static str,
) -> Result<BTreeMap<u64, T>, StoreError> {
    let mut loads = BTreeMap::new();
    for item in db.iterator_cf(cf(db, CF_NODES), IteratorMode::Start) {
        let (key, bytes) = item?;
        if is_load_key(&key, suffix) {
            let id = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
            loads.insert(id, decode(what, &bytes)?);
        }
    }
    Ok(loads)
}

/// Every node ever registered, by node id, including tombstones.
pub fn read_nodes(db: &DB) -> Result<BTreeMap<u64, NodeEntry>, StoreError> {
    let mut nodes = BTreeMap::new();
    for item in db.iterator_cf(cf(db, CF_NODES), IteratorMode::Start) {
        let (key, bytes) = item?;
        let load = is_load_key(&key, RELAY_LOAD_SUFFIX) || is_load_key(&key, LEAF_LOAD_SUFFIX);
        let revocation = key.len() == 40 && key.starts_with(REVOKED_PREFIX);
        let acl = key.starts_with(super::records::ACL_PREFIX);
        let placement = key.starts_with(PLACEMENT_PREFIX);
        if load || revocation || acl || placement {
            continue;
        }
        let id = u64::from_be_bytes(
            key.as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("node key is not 8 bytes"))?,
        );
        nodes.insert(id, decode("node entry", &bytes)?);
    }
    Ok(nodes)
}

/// The next node id to allocate, as of the applied state.
pub(super) fn read_next_node_id(db: &DB) -> Result<u64, StoreError> {
    Ok(db
        .get_pinned_cf(cf(db, CF_SM_META), NEXT_NODE_ID_KEY)?
        .map(|bytes| decode::<u64>("next node id", &bytes))
        .transpose()?
        .unwrap_or(1))
}

/// Applies node table commands (and the node side of membership entries) for one batch. Node entries and the
/// next node id are kept here while the batch is applied and written by [`NodeWriter::finish`]; relay loads and
/// revocations go into the batch at once (no later command of a batch reads them).
pub struct NodeWriter<'a> {
    db: &'a DB,
    next_node_id: u64,
    /// Node entries changed earlier in this batch.
    touched: BTreeMap<u64, NodeEntry>,
    /// The next journal sequence number, once a journal entry of this batch has read it.
    journal_next: Option<u64>,
    /// The adoption as this batch left it, once a command of the batch changed it.
    adoption: Option<Option<Adoption>>,
}

impl<'a> NodeWriter<'a> {
    pub fn new(db: &'a DB) -> Result<Self, StoreError> {
        Ok(Self {
            db,
            next_node_id: read_next_node_id(db)?,
            touched: BTreeMap::new(),
            journal_next: None,
            adoption: None,
        })
    }

    /// A membership entry: every node that appears in a membership is in the node table, and its id is taken.
    pub fn add_members<'m>(
        &mut self,
        members: impl IntoIterator<Item = (&'m u64, &'m NodeInfo)>,
    ) -> Result<(), StoreError> {
        for (id, info) in members {
            self.next_node_id = self.next_node_id.max(id + 1);
            let known = self.touched.contains_key(id)
                || self
                    .db
                    .get_pinned_cf(cf(self.db, CF_NODES), id.to_be_bytes())?
                    .is_some();
            if !known {
                self.touched.insert(
                    *id,
                    NodeEntry {
                        info: info.clone(),
                        removed: false,
                    },
                );
            }
        }
        Ok(())
    }

    /// Writes the node entries changed in this batch and the next node id.
    pub fn finish(self, batch: &mut WriteBatch) -> Result<(), StoreError> {
        for (id, entry) in &self.touched {
            batch.put_cf(
                cf(self.db, CF_NODES),
                id.to_be_bytes(),
                encode("node entry", entry)?,
            );
        }
        batch.put_cf(
            cf(self.db, CF_SM_META),
            NEXT_NODE_ID_KEY,
            encode("next node id", &self.next_node_id)?,
        );
        Ok(())
    }

    /// The node table with this batch's changes laid over it.
    fn all_nodes(&self) -> Result<BTreeMap<u64, NodeEntry>, StoreError> {
        let mut nodes = read_nodes(self.db)?;
        nodes.extend(self.touched.iter().map(|(id, entry)| (*id, entry.clone())));
        Ok(nodes)
    }
}

/// Allocates the next node id, or for a retried join (a live node with the same peer id) answers its id again.
impl Apply<RegisterNode> for NodeWriter<'_> {
    fn apply(
        &mut self,
        _batch: &mut WriteBatch,
        op: &RegisterNode,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let mut existing = None;
        for (id, entry) in self.all_nodes()? {
            if entry.info.peer_id == op.node.peer_id && !entry.removed {
                existing = Some(id);
            }
        }
        let id = match existing {
            Some(id) => id,
            None => {
                let id = self.next_node_id;
                self.next_node_id += 1;
                id
            }
        };
        self.touched.insert(
            id,
            NodeEntry {
                info: op.node.clone(),
                removed: false,
            },
        );
        Ok(Response::NodeId(id))
    }
}

impl Apply<TombstoneNode> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &TombstoneNode,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let node_id = op.node_id;
        let current = match self.touched.get(&node_id) {
            Some(entry) => Some(entry.clone()),
            None => self
                .db
                .get_pinned_cf(cf(self.db, CF_NODES), node_id.to_be_bytes())?
                .map(|bytes| decode::<NodeEntry>("node entry", &bytes))
                .transpose()?,
        };
        Ok(match current {
            Some(mut entry) => {
                entry.removed = true;
                self.touched.insert(node_id, entry);
                // A removed node's score and leaf count mean nothing any more (its id is never reused).
                batch.delete_cf(cf(self.db, CF_NODES), score_key(node_id));
                batch.delete_cf(cf(self.db, CF_NODES), load_key(node_id, LEAF_LOAD_SUFFIX));
                Response::Done
            }
            None => Response::Rejected(Rejection::UnknownNode(node_id)),
        })
    }
}

impl Apply<command::RelayLoad> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &command::RelayLoad,
        at: Applied,
    ) -> Result<Response, StoreError> {
        let load = RelayLoad {
            active: op.active,
            capacity: op.capacity,
            at_ms: at.at_ms,
        };
        batch.put_cf(
            cf(self.db, CF_NODES),
            load_key(op.node_id, RELAY_LOAD_SUFFIX),
            encode("relay load", &load)?,
        );
        Ok(Response::Done)
    }
}

impl Apply<command::LeafLoad> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &command::LeafLoad,
        at: Applied,
    ) -> Result<Response, StoreError> {
        let load = LeafLoad {
            sessions: op.sessions,
            at_ms: at.at_ms,
        };
        batch.put_cf(
            cf(self.db, CF_NODES),
            load_key(op.node_id, LEAF_LOAD_SUFFIX),
            encode("leaf load", &load)?,
        );
        Ok(Response::Done)
    }
}

/// Remembers the revocation and when it was applied.
impl Apply<RevokeCertificate> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &RevokeCertificate,
        at: Applied,
    ) -> Result<Response, StoreError> {
        batch.put_cf(
            cf(self.db, CF_NODES),
            revoked_key(&op.fingerprint),
            encode("revocation time", &at.at_ms)?,
        );
        Ok(Response::Done)
    }
}

impl Apply<SetPlacement> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &SetPlacement,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        batch.put_cf(
            cf(self.db, CF_NODES),
            TARGETS_KEY,
            encode("placement targets", &op.targets)?,
        );
        Ok(Response::Done)
    }
}

/// Appends to the journal and drops what falls out of the last [`JOURNAL_KEPT`]. The next sequence number is
/// one past the last stored entry, counted on within a batch.
impl Apply<PlacementJournal> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &PlacementJournal,
        at: Applied,
    ) -> Result<Response, StoreError> {
        let seq = match self.journal_next {
            Some(seq) => seq,
            None => read_placement_journal(self.db)?
                .last()
                .map_or(1, |entry| entry.seq + 1),
        };
        self.journal_next = Some(seq + 1);
        let entry = JournalEntry {
            seq,
            at_ms: at.at_ms,
            entry: op.clone(),
        };
        batch.put_cf(
            cf(self.db, CF_NODES),
            journal_key(seq),
            encode("placement journal entry", &entry)?,
        );
        if let Some(old) = seq.checked_sub(JOURNAL_KEPT) {
            // Entries are numbered without gaps, so exactly one falls out per new one.
            batch.delete_cf(cf(self.db, CF_NODES), journal_key(old));
        }
        Ok(Response::Done)
    }
}

impl Apply<Candidate> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &Candidate,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let key = candidate_key(&op.peer);
        match &op.entry {
            Some(entry) => batch.put_cf(
                cf(self.db, CF_NODES),
                key,
                encode("candidate entry", entry)?,
            ),
            None => {
                batch.delete_cf(cf(self.db, CF_NODES), key);
                batch.delete_cf(cf(self.db, CF_NODES), rtt_key(&op.peer));
            }
        }
        Ok(Response::Done)
    }
}

impl Apply<command::CandidateRtt> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &command::CandidateRtt,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        batch.put_cf(
            cf(self.db, CF_NODES),
            rtt_key(&op.peer),
            encode("candidate round trip", &op.rtt_us)?,
        );
        Ok(Response::Done)
    }
}

impl Apply<GrantEligibility> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &GrantEligibility,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let nodes = cf(self.db, CF_NODES);
        let mut keys: Vec<Vec<u8>> = op.peers.iter().map(grant_key).collect();
        if op.all {
            keys.push(GRANT_ALL_KEY.to_vec());
        }
        for key in keys {
            if op.revoke {
                batch.delete_cf(nodes, key);
            } else {
                batch.put_cf(nodes, key, []);
            }
        }
        Ok(Response::Done)
    }
}

impl Apply<command::NodeScore> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &command::NodeScore,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let key = score_key(op.node_id);
        match &op.score {
            Some(score) => batch.put_cf(cf(self.db, CF_NODES), key, encode("node score", score)?),
            None => batch.delete_cf(cf(self.db, CF_NODES), key),
        }
        Ok(Response::Done)
    }
}

impl Apply<NodeZone> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &NodeZone,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let key = zone_key(op.node_id);
        match &op.zone {
            Some(zone) => batch.put_cf(cf(self.db, CF_NODES), key, encode("zone", zone)?),
            None => batch.delete_cf(cf(self.db, CF_NODES), key),
        }
        Ok(Response::Done)
    }
}

impl Apply<NodeCertificate> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &NodeCertificate,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        batch.put_cf(
            cf(self.db, CF_NODES),
            [CERT_PREFIX, &op.node_id.to_be_bytes()].concat(),
            encode("certificate fingerprint", &op.fingerprint)?,
        );
        Ok(Response::Done)
    }
}

impl NodeWriter<'_> {
    fn current_adoption(&self) -> Result<Option<Adoption>, StoreError> {
        match &self.adoption {
            Some(adoption) => Ok(adoption.clone()),
            None => read_adoption(self.db),
        }
    }

    fn store_adoption(
        &mut self,
        batch: &mut WriteBatch,
        adoption: Option<Adoption>,
    ) -> Result<(), StoreError> {
        match &adoption {
            Some(adoption) => batch.put_cf(
                cf(self.db, CF_NODES),
                ADOPTION_KEY,
                encode("adoption", adoption)?,
            ),
            None => batch.delete_cf(cf(self.db, CF_NODES), ADOPTION_KEY),
        }
        self.adoption = Some(adoption);
        Ok(())
    }
}

impl NodeWriter<'_> {
    fn record_issued(
        &mut self,
        batch: &mut WriteBatch,
        peer: &PeerKey,
        fingerprint: &[u8; 32],
        not_after_ms: u64,
    ) -> Result<(), StoreError> {
        batch.put_cf(
            cf(self.db, CF_NODES),
            issued_key(peer, fingerprint),
            encode("issued validity", &not_after_ms)?,
        );
        Ok(())
    }
}

/// Records a certificate issued to a key, and drops that key's records of certificates expired by then.
impl Apply<RecordIssued> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &RecordIssued,
        at: Applied,
    ) -> Result<Response, StoreError> {
        for (fingerprint, until) in read_issued(self.db, &op.peer)? {
            if until < at.at_ms {
                batch.delete_cf(cf(self.db, CF_NODES), issued_key(&op.peer, &fingerprint));
            }
        }
        self.record_issued(batch, &op.peer, &op.fingerprint, op.not_after_ms)?;
        Ok(Response::Done)
    }
}

impl Apply<SetAdoption> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &SetAdoption,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        self.store_adoption(batch, op.adoption.clone())?;
        Ok(Response::Done)
    }
}

/// Stores the certificate only in the adoption it was signed for, and only the first one.
impl Apply<IssueCertificate> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &IssueCertificate,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        match self.current_adoption()? {
            Some(mut adoption)
                if adoption.peer == op.peer
                    && adoption.started_ms == op.started_ms
                    && adoption.issued.is_none() =>
            {
                adoption.issued = Some(op.issued.clone());
                self.store_adoption(batch, Some(adoption))?;
                self.record_issued(
                    batch,
                    &op.peer,
                    &op.issued.fingerprint,
                    op.issued.not_after_ms,
                )?;
                Ok(Response::Done)
            }
            _ => Ok(Response::Rejected(Rejection::NoSuchAdoption)),
        }
    }
}

impl Apply<NodeIssuer> for NodeWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &NodeIssuer,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let key = [ISSUER_PREFIX, &op.node_id.to_be_bytes()].concat();
        match op.not_after_ms {
            Some(until) => batch.put_cf(
                cf(self.db, CF_NODES),
                key,
                encode("issuer validity", &until)?,
            ),
            None => batch.delete_cf(cf(self.db, CF_NODES), key),
        }
        Ok(Response::Done)
    }
}
