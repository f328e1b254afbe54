//! Login throttling: attempts per account and per client address, in memory (GCRA through
//! governor). An unknown email is throttled exactly like a known one, so the answer says
//! nothing about which emails exist.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct LoginThrottle {
    per_account: DefaultKeyedRateLimiter<String>,
    per_ip: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

/// Attempts allowed per account: a burst of 10, then one every 6 s (10 a minute).
pub const ACCOUNT_PER_MINUTE: u32 = 10;
/// Attempts allowed per client address: a burst of 60, then 60 a minute (addresses are
/// shared behind NAT).
pub const IP_PER_MINUTE: u32 = 60;

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new(ACCOUNT_PER_MINUTE, IP_PER_MINUTE)
    }
}

impl LoginThrottle {
    pub fn new(account_per_minute: u32, ip_per_minute: u32) -> Self {
        let quota =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_account: RateLimiter::keyed(quota(account_per_minute)),
            per_ip: RateLimiter::keyed(quota(ip_per_minute)),
            checks: AtomicU64::new(0),
        }
    }

    /// `Err(wait)` when the account or the address has tried too often.
    pub fn check(&self, account: &str, ip: Option<&str>) -> Result<(), Duration> {
        // Forget idle keys now and then, so the maps stay as small as the active set.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.per_account.retain_recent();
            self.per_ip.retain_recent();
        }
        let now = DefaultClock::default().now();
        if let Some(ip) = ip {
            self.per_ip
                .check_key(&ip.to_owned())
                .map_err(|n| n.wait_time_from(now))?;
        }
        self.per_account
            .check_key(&account.to_owned())
            .map_err(|n| n.wait_time_from(now))
    }
}
