//! Quotas: `N/day` or `N/month` requests, counted in UTC calendar periods, and the period
//! that contains a given instant. Everything here takes the time as an argument, so the
//! calendar is tested at any instant (a month's end, a leap day) without waiting for it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{Date, Month, OffsetDateTime};

/// How long one quota runs before it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

/// `N/day` or `N/month`: at most `limit` requests in each UTC calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimit {
    pub limit: u64,
    pub period: Period,
}

impl QuotaLimit {
    pub fn parse(text: &str) -> Option<Self> {
        let (n, unit) = text.trim().split_once('/')?;
        let limit: u64 = n.trim().parse().ok().filter(|&n| n > 0)?;
        let period = match unit.trim() {
            "day" => Period::Day,
            "month" => Period::Month,
            _ => return None,
        };
        Some(Self { limit, period })
    }
}

/// One calendar period, as whole seconds since the Unix epoch: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub start: u64,
    pub end: u64,
}

impl Window {
    /// Whole seconds from `now` until the period ends, at least 1: what `Retry-After` says.
    pub fn secs_left(&self, now: SystemTime) -> u64 {
        self.end.saturating_sub(epoch_secs(now)).max(1)
    }
}

impl Period {
    /// The period that holds `now`.
    pub fn window(self, now: SystemTime) -> Window {
        let at = OffsetDateTime::from(now);
        let date = at.date();
        let (start, end) = match self {
            Self::Day => (date, date.next_day()),
            Self::Month => {
                let first = date.replace_day(1).ok();
                let next = match date.month() {
                    Month::December => Date::from_calendar_date(date.year() + 1, Month::January, 1).ok(),
                    month => Date::from_calendar_date(date.year(), month.next(), 1).ok(),
                };
                (first.unwrap_or(date), next)
            }
        };
        let secs = |d: Date| u64::try_from(d.midnight().assume_utc().unix_timestamp()).unwrap_or(0);
        let start = secs(start);
        // Only the last representable day has no next one; a period that never ends is fine there.
        let end = end.map_or(u64::MAX, secs);
        Window { start, end }
    }
}

/// Whole seconds since the Unix epoch (0 before it).
pub fn epoch_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The instant `secs` after the Unix epoch.
pub fn from_epoch_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn at(t: OffsetDateTime) -> SystemTime {
        t.into()
    }

    fn secs(t: OffsetDateTime) -> u64 {
        t.unix_timestamp() as u64
    }

    #[test]
    fn quotas_parse() {
        assert_eq!(
            QuotaLimit::parse("100000/month"),
            Some(QuotaLimit { limit: 100_000, period: Period::Month })
        );
        assert_eq!(QuotaLimit::parse(" 5 / day "), Some(QuotaLimit { limit: 5, period: Period::Day }));
        for bad in ["0/day", "5/d", "5/week", "x/month", "5", "-1/day", "5/s"] {
            assert_eq!(QuotaLimit::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_day_runs_from_utc_midnight_to_midnight() {
        let w = Period::Day.window(at(datetime!(2026-11-29 23:59:59 UTC)));
        assert_eq!(w.start, secs(datetime!(2026-11-29 00:00 UTC)));
        assert_eq!(w.end, secs(datetime!(2026-11-30 00:00 UTC)));
        assert_eq!(w.secs_left(at(datetime!(2026-11-29 23:59:59 UTC))), 1);
        // An instant given in another offset is judged in UTC.
        let w = Period::Day.window(at(datetime!(2026-11-30 01:00 +02:00)));
        assert_eq!(w.start, secs(datetime!(2026-11-29 00:00 UTC)));
    }

    #[test]
    fn months_end_on_the_first_of_the_next_across_years_and_leap_days() {
        let cases = [
            (
                datetime!(2026-11-30 23:59:59 UTC),
                datetime!(2026-11-01 00:00 UTC),
                datetime!(2026-12-01 00:00 UTC),
            ),
            (
                datetime!(2026-12-31 12:00 UTC),
                datetime!(2026-12-01 00:00 UTC),
                datetime!(2027-01-01 00:00 UTC),
            ),
            (
                datetime!(2028-02-29 08:00 UTC),
                datetime!(2028-02-01 00:00 UTC),
                datetime!(2028-03-01 00:00 UTC),
            ),
            (
                datetime!(2027-01-01 00:00 UTC),
                datetime!(2027-01-01 00:00 UTC),
                datetime!(2027-02-01 00:00 UTC),
            ),
        ];
        for (now, start, end) in cases {
            let w = Period::Month.window(at(now));
            assert_eq!((w.start, w.end), (secs(start), secs(end)), "{now}");
        }
        // One second before and at the boundary: two different windows.
        let before = Period::Month.window(at(datetime!(2026-11-30 23:59:59 UTC)));
        let after = Period::Month.window(at(datetime!(2026-12-01 00:00 UTC)));
        assert_eq!(before.end, after.start);
        assert_ne!(before, after);
    }
}
