//! Waiting without sleeping for a fixed time: bounded polls, and the one deadline for what
//! the product promises "within about a second".

use std::time::Duration;

use tokio::time::Instant;

/// How long a test waits for something the product promises within about a second (a reload,
/// a key edit reaching a running gateway, a timeout of 1 s firing): five times that, so a
/// loaded two-core machine shows up as a slow number, not a failure.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// How often a test looks again while waiting.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// Upper bound on the attempts of one wait, so every loop is bounded by count as well as time.
pub const MAX_POLLS: u32 = 1_000;

/// A bounded poll: `while poll.again().await { … }` runs the body at once, then every
/// [`POLL_EVERY`] until `within` has passed or [`MAX_POLLS`] attempts were made.
pub struct Attempts {
    pub start: Instant,
    within: Duration,
    count: u32,
}

impl Attempts {
    pub fn within(within: Duration) -> Self {
        Self { start: Instant::now(), within, count: 0 }
    }

    pub async fn again(&mut self) -> bool {
        if self.count > 0 {
            if self.start.elapsed() >= self.within || self.count >= MAX_POLLS {
                return false;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        self.count += 1;
        true
    }

    pub fn report(&self) -> String {
        format!("{} attempts in {} ms", self.count, self.start.elapsed().as_millis())
    }
}

/// A duration in whole milliseconds, for messages.
pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}
