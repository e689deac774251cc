//! Counters in this process's memory: buckets, quota counts and usage in concurrent maps that
//! outlive reloads. The whole store without `[state]` or `[cluster]`, and the part of the other
//! two that decides locally.

use std::time::SystemTime;

use dashmap::DashMap;

use super::usage::UsageLog;
use super::{Admission, Ask, Counters, Pending, Refusal, StoreStatus, Usage, Verdict};
use crate::quota::{Period, Window};
use crate::ratelimit::Bucket;

/// A subject's count in one quota period; `unsaved` and `touched` are for stores that write it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaCell {
    pub window: Window,
    pub used: u64,
    pub unsaved: u64,
    pub touched: bool,
}

#[derive(Debug, Default)]
pub struct Memory {
    buckets: DashMap<Box<[u8]>, Bucket>,
    quotas: DashMap<Box<[u8]>, QuotaCell>,
    pub(super) usage: UsageLog,
}

impl Memory {
    /// Decides a request. `used_elsewhere` is quota already spent that this process does not
    /// count itself (what Redis last reported, while it is out of reach).
    pub fn decide(&self, ask: &Ask<'_>, used_elsewhere: u64) -> Verdict {
        let name = ask.subject.name();
        // Guards are taken bucket first, then quota, everywhere: no lock-order cycle. Neither
        // is held across an await (there is none here).
        let mut bucket = ask.rate.map(|rate| {
            let mut bucket =
                self.buckets.entry(name.clone()).or_insert_with(|| Bucket::full(rate, ask.instant));
            bucket.refill(rate, ask.instant);
            (bucket, rate)
        });
        if let Some((bucket, rate)) = &bucket
            && !bucket.has_token()
        {
            return Err(Refusal::RateLimited(bucket.exceeded(*rate)));
        }
        if let Some(quota) = ask.quota {
            let window = quota.period.window(ask.now);
            let mut cell =
                self.quotas.entry(name).or_insert(QuotaCell { window, used: 0, unsaved: 0, touched: false });
            if cell.window != window {
                *cell = QuotaCell { window, used: 0, unsaved: 0, touched: false };
            }
            if cell.used.saturating_add(used_elsewhere) >= quota.limit {
                return Err(Refusal::QuotaExceeded { retry_after_secs: window.secs_left(ask.now) });
            }
            cell.used += 1;
            cell.unsaved += 1;
            cell.touched = true;
        }
        Ok(bucket.as_mut().map(|(bucket, rate)| {
            bucket.take();
            bucket.quota(*rate)
        }))
    }

    /// Every quota count with something a store has not seen, marked as seen.
    pub fn take_unsaved_quotas(&self) -> Vec<(Box<[u8]>, QuotaCell)> {
        let mut out = Vec::new();
        for mut entry in self.quotas.iter_mut() {
            if entry.touched {
                out.push((entry.key().clone(), *entry.value()));
                entry.unsaved = 0;
                entry.touched = false;
            }
        }
        out
    }

    /// Puts back a count a store holds (at start); never lowers what was counted here.
    pub fn restore_quota(&self, subject: &[u8], stored: QuotaCell) {
        let mut cell = self.quotas.entry(Box::from(subject)).or_insert(QuotaCell {
            unsaved: 0,
            touched: false,
            ..stored
        });
        if cell.window == stored.window {
            cell.used = cell.used.max(stored.used);
        }
    }

    /// Gives back counts that could not be written, so the next attempt includes them.
    pub fn return_unsaved_quota(&self, subject: &[u8], window: Window, unsaved: u64) {
        if let Some(mut cell) = self.quotas.get_mut(subject)
            && cell.window == window
        {
            cell.unsaved += unsaved;
            cell.touched = true;
        }
    }

    /// Forgets every bucket and quota count: after an outage, the shared store counts again.
    pub fn clear_limits(&self) {
        self.buckets.clear();
        self.quotas.clear();
    }

    pub fn usage_now(&self, keys: &[(String, Period)], now: SystemTime) -> Vec<Usage> {
        keys.iter().map(|(id, _)| self.usage.get(id).map(|c| c.usage(now)).unwrap_or_default()).collect()
    }
}

impl Counters for Memory {
    fn admit<'a>(&'a self, ask: Ask<'a>) -> Admission<'a> {
        Admission::Decided(Some(self.decide(&ask, 0)))
    }

    fn record(&self, key_id: &[u8], period: Period, now: SystemTime) {
        self.usage.record(key_id, period, now);
    }

    fn usage<'a>(
        &'a self,
        keys: &'a [(String, Period)],
        now: SystemTime,
    ) -> Pending<'a, Result<Vec<Usage>, String>> {
        Box::pin(std::future::ready(Ok(self.usage_now(keys, now))))
    }

    fn status(&self) -> StoreStatus {
        StoreStatus { kind: "memory", cluster: None, cluster_errors: 0 }
    }

    fn flush(&self) -> Pending<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use time::macros::datetime;

    use super::*;
    use crate::counters::Subject;
    use crate::keys::RateLimit;
    use crate::quota::QuotaLimit;

    fn ask<'a>(
        subject: Subject<'a>,
        rate: Option<RateLimit>,
        quota: Option<QuotaLimit>,
        now: SystemTime,
        instant: Instant,
    ) -> Ask<'a> {
        Ask { subject, rate, quota, now, instant }
    }

    #[test]
    fn a_quota_resets_when_the_month_turns() {
        let memory = Memory::default();
        let quota = Some(QuotaLimit { limit: 2, period: Period::Month });
        let end_of_month: SystemTime = datetime!(2026-11-30 23:59:50 UTC).into();
        let t = Instant::now();
        let a = Subject::Key(b"a");
        assert!(memory.decide(&ask(a, None, quota, end_of_month, t), 0).is_ok());
        assert!(memory.decide(&ask(a, None, quota, end_of_month, t), 0).is_ok());
        assert_eq!(
            memory.decide(&ask(a, None, quota, end_of_month, t), 0),
            Err(Refusal::QuotaExceeded { retry_after_secs: 10 }),
            "Retry-After runs to the end of the month"
        );
        let next_month: SystemTime = datetime!(2026-12-01 00:00:00 UTC).into();
        assert!(memory.decide(&ask(a, None, quota, next_month, t), 0).is_ok(), "a new month, a new quota");
    }

    #[test]
    fn a_refused_request_spends_neither_token_nor_quota() {
        let memory = Memory::default();
        let rate = Some(RateLimit { tokens: 1, period: Duration::from_secs(60) });
        let quota = Some(QuotaLimit { limit: 1, period: Period::Day });
        let now: SystemTime = datetime!(2026-11-29 12:00 UTC).into();
        let t = Instant::now();
        let c = Subject::Consumer(b"acme");
        assert!(memory.decide(&ask(c, rate, quota, now, t), 0).is_ok());
        // No token: rate_limited, and the quota is not touched.
        assert!(matches!(memory.decide(&ask(c, rate, quota, now, t), 0), Err(Refusal::RateLimited(_))));
        // A minute later a token is back but the quota is spent: the token stays in the bucket.
        let later = t + Duration::from_secs(60);
        assert!(matches!(
            memory.decide(&ask(c, rate, quota, now, later), 0),
            Err(Refusal::QuotaExceeded { .. })
        ));
        assert!(matches!(memory.decide(&ask(c, rate, None, now, later), 0), Ok(Some(q)) if q.remaining == 0));
        // A key id spelled like the consumer has buckets of its own.
        assert!(memory.decide(&ask(Subject::Key(b"acme"), rate, quota, now, t), 0).is_ok());
        // Quota spent elsewhere counts.
        assert!(matches!(
            memory.decide(&ask(Subject::Key(b"x"), None, quota, now, t), 1),
            Err(Refusal::QuotaExceeded { .. })
        ));
    }
}
