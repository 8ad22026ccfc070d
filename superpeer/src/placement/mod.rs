//! Placement: which super peers vote, which stand by, and the controller on the Raft leader that keeps it so.
//!
//! - [`decide`] is the pure decision function: a view of the cluster in, at most one membership action out.
//!   It does no I/O and reads no clock, so its rules are tested on tables and properties.
//! - [`health`] turns openraft's per-member heartbeat and replication metrics, sampled over time, into the
//!   health classes `decide` reads (stable, healthy, suspect, dead).
//! - [`candidates`] judges nodes that offer to serve (their reports, the eligibility gates, the score);
//!   [`offers`] runs that on the candidate's host, with the dial-back proof by two other members.
//! - [`issuer`] signs the certificates of adopted nodes, on the super peers an operator gave an issuer;
//!   [`renewal`] is the adopted node's side, renewing its own before it expires.
//! - [`controller`] is the leader's task: sample, decide, carry the action out with openraft's membership
//!   preconditions (so a stale leader or a concurrent change cannot act), and record the decision so
//!   `vesperctl placement explain` can tell an operator what it did and why.

pub mod admin;
pub mod candidates;
pub mod controller;
pub mod decide;
pub mod health;
pub mod issuer;
pub mod offers;
pub mod renewal;
pub mod self_report;
pub mod settings;
