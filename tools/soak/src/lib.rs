//! # apikeys-soak
//!
//! The soak under faults (`scripts/soak`): three replica processes, each a client with the
//! verified-key cache, batched usage, leased rate limits and leased credits, and a clock
//! skewed by up to ±30 s, check keys drawn by Zipf from thousands while an admin process
//! revokes, updates, rolls and deletes them; the database is restarted, the network to it
//! cut, refused, delayed and black-holed by `apikeys_testing::proxy::Proxy`, and the signing secret rotated
//! by a rolling restart. Every event is recorded ([`events::Event`]); afterwards every
//! invariant is checked from the record ([`check::check`]) and printed with its figure.
//!
//! ```sh
//! scripts/soak                                  # 10 minutes on each backend
//! scripts/soak --minutes 2 --backend postgres --seed 7
//! ```

pub mod check;
pub mod events;
