//! Per-key rate limits: a token bucket per key id, kept outside the snapshot so a reload
//! (editing some other key, say) neither refills nor forgets a bucket.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::keys::RateLimit;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

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

#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: DashMap<Box<[u8]>, Bucket>,
}

impl RateLimiter {
    /// Takes one token from the key's bucket of `rate.tokens`, refilled at `rate.tokens` per
    /// `rate.period`; a new bucket starts full, so N requests may come back to back.
    pub fn acquire(&self, key_id: &[u8], rate: RateLimit, now: Instant) -> Result<Quota, Exceeded> {
        let capacity = f64::from(rate.tokens);
        let per_sec = capacity / rate.period.as_secs_f64();
        // The entry guard is dropped before this function returns: never held across an await.
        let mut bucket =
            self.buckets.entry(Box::from(key_id)).or_insert(Bucket { tokens: capacity, updated: now });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(capacity);
        bucket.updated = now;
        let taken = bucket.tokens >= 1.0;
        if taken {
            bucket.tokens -= 1.0;
        }
        let tokens = bucket.tokens;
        drop(bucket);
        let quota = Quota {
            limit: rate.tokens,
            remaining: tokens.floor() as u32,
            reset_secs: ceil_secs((capacity - tokens) / per_sec),
        };
        if taken {
            Ok(quota)
        } else {
            Err(Exceeded { quota, retry_after_secs: ceil_secs((1.0 - tokens) / per_sec).max(1) })
        }
    }
}

fn ceil_secs(secs: f64) -> u64 {
    Duration::from_secs_f64(secs.max(0.0)).as_secs_f64().ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_pass_then_refused_then_refilled() {
        let limiter = RateLimiter::default();
        let rate = RateLimit { tokens: 3, period: Duration::from_secs(1) };
        let t0 = Instant::now();
        for remaining in [2, 1, 0] {
            assert_eq!(limiter.acquire(b"k", rate, t0).map(|q| q.remaining), Ok(remaining));
        }
        let refused = limiter.acquire(b"k", rate, t0).unwrap_err();
        assert_eq!(refused.retry_after_secs, 1);
        assert_eq!(refused.quota.remaining, 0);
        // Another key has its own bucket.
        assert!(limiter.acquire(b"other", rate, t0).is_ok());
        // A third of a second brings one token back.
        assert!(limiter.acquire(b"k", rate, t0 + Duration::from_millis(340)).is_ok());
        assert!(limiter.acquire(b"k", rate, t0 + Duration::from_millis(340)).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_until_a_token() {
        let limiter = RateLimiter::default();
        let rate = RateLimit { tokens: 2, period: Duration::from_secs(60) };
        let t0 = Instant::now();
        assert!(limiter.acquire(b"k", rate, t0).is_ok());
        assert_eq!(limiter.acquire(b"k", rate, t0).map(|q| q.reset_secs), Ok(60));
        assert_eq!(limiter.acquire(b"k", rate, t0).unwrap_err().retry_after_secs, 30);
    }
}
