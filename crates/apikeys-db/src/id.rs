//! Ids minted from the client's clock.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use uuid::{ContextV7, Timestamp, Uuid};

/// Mints UUID v7 ids whose timestamp is the client's clock, not the system's, so that under
/// an injected clock id order and `created_at` agree. Ids one client mints are strictly
/// increasing (uuid's v7 counter, shared by the client's tasks).
#[derive(Debug, Default)]
pub(crate) struct IdMinter {
    context: Mutex<ContextV7>,
}

impl IdMinter {
    /// A new id stamped with `now`.
    pub(crate) fn mint(&self, now: DateTime<Utc>) -> Uuid {
        // Before 1970 (only a test clock can say so) the id carries the epoch.
        let seconds = u64::try_from(now.timestamp()).unwrap_or(0);
        let nanos = now.timestamp_subsec_nanos();
        // uuid implements its counter for a Mutex, with the same poisoned-lock policy as
        // ours (crate::lock): the counter is always in a usable state.
        Uuid::new_v7(Timestamp::from_unix(&self.context, seconds, nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn ids_follow_the_given_clock_and_increase() {
        let minter = IdMinter::default();
        let t = Utc.with_ymd_and_hms(2001, 2, 3, 4, 5, 6).unwrap();
        let ids: Vec<Uuid> = (0..1000).map(|_| minter.mint(t)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing within one instant");
        let (secs, _) = ids[0].get_timestamp().unwrap().to_unix();
        assert_eq!(i64::try_from(secs).unwrap(), t.timestamp());
        let later = minter.mint(t + chrono::TimeDelta::days(400));
        assert!(later > ids[999]);
        assert_eq!(later.get_version_num(), 7);
    }
}
