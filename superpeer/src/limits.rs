//! Rate limiting shared by the services: a token bucket, and a fixed table of buckets keyed by source address.

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::time::Instant;

pub use vesper_proto::rate::TokenBucket;

/// Token buckets keyed by source IP, in a fixed-size table: a source hashes (with a per-process random key, so
/// an attacker cannot pick colliding addresses) to one bucket. Memory stays the same however many addresses
/// send, including spoofed floods from random ones; two sources that share a bucket share its rate, which errs
/// on the side of answering less.
pub struct SourceBuckets {
    buckets: Vec<TokenBucket>,
    hasher: std::collections::hash_map::RandomState,
    rate: u32,
    burst: u32,
}

impl SourceBuckets {
    /// `slots` buckets (rounded up to a power of two), each `rate` per second with bursts of `burst`.
    pub fn new(slots: usize, rate: u32, burst: u32) -> Self {
        let now = Instant::now();
        Self {
            buckets: vec![TokenBucket::new(burst, now); slots.max(1).next_power_of_two()],
            hasher: std::collections::hash_map::RandomState::new(),
            rate,
            burst,
        }
    }

    /// Takes a token from `source`'s bucket if there is one.
    pub fn take(&mut self, source: IpAddr, now: Instant) -> bool {
        let mut hasher = self.hasher.build_hasher();
        source.hash(&mut hasher);
        let slot = (std::hash::Hasher::finish(&hasher) as usize) & (self.buckets.len() - 1);
        self.buckets[slot].take(self.rate, self.burst, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let mut table = SourceBuckets::new(4096, 10, 20);
        let start = Instant::now();
        let flooder: IpAddr = "192.0.2.1".parse().unwrap();
        let answered = (0..1000).filter(|_| table.take(flooder, start)).count();
        assert_eq!(answered, 20, "the burst, then nothing at the same instant");
        // One second later: ten more.
        let later = start + Duration::from_secs(1);
        let answered = (0..1000).filter(|_| table.take(flooder, later)).count();
        assert_eq!(answered, 10);
        // Another source has its own bucket (the odds of sharing one of 4096 slots are checked over many).
        let others = (0..100u8)
            .filter(|&i| table.take(IpAddr::from([198, 51, 100, i]), later))
            .count();
        assert!(
            others >= 95,
            "only {others} of 100 other sources were answered"
        );
    }
}

/// Refuses a call whose request metadata is over `max_bytes` (each header counted as HTTP/2 counts it: name,
/// value and 32 bytes), with RESOURCE_EXHAUSTED naming the limit. It runs before the service, on the call alone:
/// the connection, and a session stream on it, go on.
#[derive(Clone, Copy)]
pub struct MetadataLimit {
    pub max_bytes: usize,
}

impl tonic::service::Interceptor for MetadataLimit {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let headers = request.metadata().as_ref();
        let size: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        if size > self.max_bytes {
            return Err(crate::error::ServiceError::LimitReached(format!(
                "request metadata is {size} bytes in {} headers; at most {} bytes are allowed (max_metadata_bytes)",
                headers.len(),
                self.max_bytes
            ))
            .into_status());
        }
        Ok(request)
    }
}
