//! Ids minted from the client's clock.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use uuid::{Timestamp, Uuid};

use crate::lock::lock;

/// An id every replica derives alike from `parts`, in the namespace `domain`: the first 16
/// bytes of SHA-256(`domain`, `parts`…) as a UUID of version 8 (so never one of the v7 ids
/// minted here).
pub(crate) fn derived(domain: &[u8], parts: &[&[u8]]) -> Uuid {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(domain);
    for part in parts {
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Bits of the UUID v7 counter that orders ids minted in one millisecond.
const COUNTER_BITS: u8 = 42;

/// Mints UUID v7 ids whose timestamp is the client's clock, not the system's, so that id
/// order and `created_at` agree even under an injected clock: an id carries exactly the
/// millisecond of the time it was minted at, and ids one client mints in one millisecond
/// are strictly increasing (a counter seeded at random each new millisecond).
///
/// Unlike uuid's own v7 context, a clock that moves back gives ids that sort back too:
/// agreement with `created_at` is the point, not monotonic ids.
#[derive(Debug, Default)]
pub(crate) struct IdMinter {
    /// The millisecond of the last id and its counter.
    last: Mutex<(i64, u64)>,
}

impl IdMinter {
    /// A new id stamped with `now`.
    pub(crate) fn mint(&self, now: DateTime<Utc>) -> Uuid {
        let ms = now.timestamp_millis().max(0); // before 1970 only a test clock can say so
        let counter = {
            let mut last = lock(&self.last);
            if last.0 == ms {
                last.1 += 1;
            } else {
                // Seeded below 2^41, so a millisecond has room for 2^41 ids before the
                // counter's 42 bits run out.
                *last = (ms, Uuid::new_v4().as_u64_pair().1 >> 23);
            }
            last.1
        };
        let seconds = u64::try_from(ms / 1000).unwrap_or(0);
        let nanos = u32::try_from(ms % 1000).unwrap_or(0) * 1_000_000;
        Uuid::new_v7(Timestamp::from_unix_time(seconds, nanos, u128::from(counter), COUNTER_BITS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeDelta, TimeZone};

    fn millis(id: Uuid) -> i64 {
        let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
        i64::try_from(secs).unwrap() * 1000 + i64::from(nanos / 1_000_000)
    }

    #[test]
    fn ids_follow_the_given_clock_and_increase_within_a_millisecond() {
        let minter = IdMinter::default();
        let t = Utc.with_ymd_and_hms(2001, 2, 3, 4, 5, 6).unwrap() + TimeDelta::microseconds(7_890);
        let ids: Vec<Uuid> = (0..1000).map(|_| minter.mint(t)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing within one instant");
        assert!(ids.iter().all(|id| millis(*id) == t.timestamp_millis()));
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        let later = minter.mint(t + TimeDelta::days(400));
        assert!(later > ids[999]);
        // A clock set back mints ids that sort before, as their times do.
        let earlier = minter.mint(t - TimeDelta::hours(1));
        assert!(earlier < ids[0]);
        assert_eq!(millis(earlier), (t - TimeDelta::hours(1)).timestamp_millis());
    }
}
