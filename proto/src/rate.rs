//! A token bucket, the rate limiter of the super peer's services and of the relay.

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    pub fn new(burst: u32, now: std::time::Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: u32, burst: u32, now: std::time::Instant) -> bool {
        self.take_n(rate, burst, 1.0, now)
    }

    /// Takes `amount` tokens if there are that many.
    pub fn take_n(&mut self, rate: u32, burst: u32, amount: f64, now: std::time::Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.last = now;
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }
}
