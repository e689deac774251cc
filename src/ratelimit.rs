//! Token buckets: N tokens refilled at N per period, the arithmetic that every counters store
//! (memory, local file, or the fallback of the Redis one) applies to its own buckets.

use std::time::{Duration, Instant};

use crate::keys::RateLimit;

/// What a limited key is told on every response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Whole seconds until the bucket is full again.
    pub reset_secs: u64,
}

/// A request over the limit, and when a token will be back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub quota: Quota,
    pub retry_after_secs: u64,
}

/// One bucket. A new bucket starts full, so N requests may come back to back.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    pub fn full(rate: RateLimit, now: Instant) -> Self {
        Self { tokens: f64::from(rate.tokens), updated: now }
    }

    /// A bucket as another store reported it (Redis), for the headers and the refusal.
    pub fn holding(tokens: f64, now: Instant) -> Self {
        Self { tokens, updated: now }
    }

    /// Adds what has dripped in since the last look; then [`Self::has_token`] says whether
    /// a request may pass, and [`Self::take`] spends the token once everything else agreed.
    pub fn refill(&mut self, rate: RateLimit, now: Instant) {
        let capacity = f64::from(rate.tokens);
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec(rate)).min(capacity);
        self.updated = now;
    }

    pub fn has_token(&self) -> bool {
        self.tokens >= 1.0
    }

    pub fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// The headers' view of this bucket.
    pub fn quota(&self, rate: RateLimit) -> Quota {
        let capacity = f64::from(rate.tokens);
        Quota {
            limit: rate.tokens,
            remaining: self.tokens.max(0.0).floor() as u32,
            reset_secs: ceil_secs((capacity - self.tokens) / per_sec(rate)),
        }
    }

    /// The refusal of a request that found no token.
    pub fn exceeded(&self, rate: RateLimit) -> Exceeded {
        Exceeded {
            quota: self.quota(rate),
            retry_after_secs: ceil_secs((1.0 - self.tokens) / per_sec(rate)).max(1),
        }
    }

    /// Takes a token if there is one: the whole decision for a key with only a rate limit.
    pub fn acquire(&mut self, rate: RateLimit, now: Instant) -> Result<Quota, Exceeded> {
        self.refill(rate, now);
        if !self.has_token() {
            return Err(self.exceeded(rate));
        }
        self.take();
        Ok(self.quota(rate))
    }
}

fn per_sec(rate: RateLimit) -> f64 {
    f64::from(rate.tokens) / rate.period.as_secs_f64()
}

pub fn ceil_secs(secs: f64) -> u64 {
    Duration::from_secs_f64(secs.max(0.0)).as_secs_f64().ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_pass_then_refused_then_refilled() {
        let rate = RateLimit { tokens: 3, period: Duration::from_secs(1) };
        let t0 = Instant::now();
        let mut bucket = Bucket::full(rate, t0);
        for remaining in [2, 1, 0] {
            assert_eq!(bucket.acquire(rate, t0).map(|q| q.remaining), Ok(remaining));
        }
        let refused = bucket.acquire(rate, t0).unwrap_err();
        assert_eq!(refused.retry_after_secs, 1);
        assert_eq!(refused.quota.remaining, 0);
        // A third of a second brings one token back.
        assert!(bucket.acquire(rate, t0 + Duration::from_millis(340)).is_ok());
        assert!(bucket.acquire(rate, t0 + Duration::from_millis(340)).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_until_a_token() {
        let rate = RateLimit { tokens: 2, period: Duration::from_secs(60) };
        let t0 = Instant::now();
        let mut bucket = Bucket::full(rate, t0);
        assert!(bucket.acquire(rate, t0).is_ok());
        assert_eq!(bucket.acquire(rate, t0).map(|q| q.reset_secs), Ok(60));
        assert_eq!(bucket.acquire(rate, t0).unwrap_err().retry_after_secs, 30);
    }
}
