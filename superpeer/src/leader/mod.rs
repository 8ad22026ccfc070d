//! Jobs that only the leader does, each a task on every node that acts only while its node leads (so a new
//! leader takes them over at once, and a deposed one stops proposing on its next check): [`expiry`] takes the
//! leaves of silent members offline and starts conferences whose time has come.

pub mod expiry;
