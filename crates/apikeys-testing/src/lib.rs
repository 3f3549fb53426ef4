//! # apikeys-testing
//!
//! Test support shared by every apikeys test suite (apikeys-db's, apikeys-axum's,
//! apikeys-cli's and their benchmarks): one fresh database per test on each backend, the
//! macro that stamps a suite out per backend, a clock tests move by hand, and the helpers
//! several suites use. Not published.
//!
//! ```ignore
//! use apikeys_testing::{TestDb, backend_tests};
//!
//! backend_tests! {
//!     keys: [create_and_verify],
//! }
//!
//! mod keys {
//!     pub async fn create_and_verify(db: apikeys_testing::TestDb) {
//!         let client = db.client().await;
//!         // ...
//!     }
//! }
//! ```
//! gives the tests `sqlite::keys::create_and_verify`, `postgres::keys::create_and_verify`
//! and `mysql::keys::create_and_verify`, each compiled in by the invoking crate's cargo
//! feature of that name.
//!
//! ## Databases are dropped, also when a test panics
//! A [`TestDb`] on PostgreSQL or MariaDB/MySQL is a database created for the test; on SQLite
//! a file in a temporary directory. [`TestDb::cleanup`] drops it at the end of a test that
//! passed. A test that panics before that still drops it: the last clone of a `TestDb` to go
//! away (during the panic's unwinding) drops the database on a thread of its own, and the
//! temporary directory goes with it. Only a test process that is killed (`SIGKILL`, a
//! harness timeout) leaves its databases behind.

// Test support: a failed unwrap is a failed test, and failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod clock;
mod db;
mod harness;
pub mod proxy;
mod races;
mod rate_limit;
mod zipf;

pub use clock::{TestClock, at};
pub use db::{Backend, DatabaseLocation, SECRET, TestDb, forged, plaintext_key};
pub use harness::run_cases;
pub use races::{Tally, admin_races, hold_key_rows, hot_path_until};
pub use rate_limit::{db_now_ms, db_now_ms_on, hammer, leave_room, window_rows};
pub use zipf::ZipfTable;

/// Stamps out one module per backend, each test running the same `async fn(TestDb)` case.
///
/// Two forms. With modules, `backend_tests! { keys: [create, revoke], ... }` gives
/// `sqlite::keys::create` (and `postgres::`, `mysql::`) calling `crate::keys::create(db)`.
/// Without, `backend_tests!([create, revoke])` gives `sqlite::create` calling
/// `crate::create(db)`.
///
/// Each backend's module is compiled only with the invoking crate's cargo feature of the same
/// name (`sqlite`, `postgres`, `mysql`); PostgreSQL and MySQL then need their server URL
/// ([`TestDb::new`]). Each test gets a fresh [`TestDb`] on a multi-thread tokio runtime
/// (4 workers; the invoking crate needs tokio with `macros`), and drops it afterwards, also
/// when the case panics.
#[macro_export]
macro_rules! backend_tests {
    ($($module:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        $crate::__stamp!(sqlite, Sqlite, "sqlite", $($module: [$($case),*]),*);
        $crate::__stamp!(postgres, Postgres, "postgres", $($module: [$($case),*]),*);
        $crate::__stamp!(mysql, MySql, "mysql", $($module: [$($case),*]),*);
    };
    ([$($case:ident),* $(,)?]) => {
        $crate::__stamp_flat!(sqlite, Sqlite, "sqlite", $($case),*);
        $crate::__stamp_flat!(postgres, Postgres, "postgres", $($case),*);
        $crate::__stamp_flat!(mysql, MySql, "mysql", $($case),*);
    };
}

/// Stamps out the cases again with shared rate limits counted in Redis
/// (`TestDb::with_redis`), on SQLite: `redis_tests! { rate_limit: [exact], ... }` gives
/// `redis::rate_limit::exact` calling `crate::rate_limit::exact(db)`. Compiled only with the
/// invoking crate's cargo features `redis` and `sqlite`.
#[macro_export]
#[allow(clippy::crate_in_macro_def)] // the cases are the invoking crate's
macro_rules! redis_tests {
    ($($module:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        #[cfg(all(feature = "redis", feature = "sqlite"))]
        mod redis {
            $(
                mod $module {
                    $(
                        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                        async fn $case() {
                            let backend = $crate::Backend::Sqlite;
                            let db = $crate::TestDb::new(backend, stringify!($case)).await;
                            let db = db.with_redis();
                            crate::$module::$case(db.clone()).await;
                            db.cleanup().await;
                        }
                    )*
                }
            )*
        }
    };
}

/// One backend's module of [`backend_tests!`], with a module per group of cases.
#[doc(hidden)]
#[macro_export]
#[allow(clippy::crate_in_macro_def)] // the cases are the invoking crate's
macro_rules! __stamp {
    ($backend:ident, $variant:ident, $feature:literal, $($module:ident: [$($case:ident),*]),*) => {
        #[cfg(feature = $feature)]
        mod $backend {
            $(
                mod $module {
                    $(
                        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                        async fn $case() {
                            let backend = $crate::Backend::$variant;
                            let db = $crate::TestDb::new(backend, stringify!($case)).await;
                            crate::$module::$case(db.clone()).await;
                            db.cleanup().await;
                        }
                    )*
                }
            )*
        }
    };
}

/// One backend's module of [`backend_tests!`], cases at the crate's root.
#[doc(hidden)]
#[macro_export]
#[allow(clippy::crate_in_macro_def)] // the cases are the invoking crate's
macro_rules! __stamp_flat {
    ($backend:ident, $variant:ident, $feature:literal, $($case:ident),*) => {
        #[cfg(feature = $feature)]
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend = $crate::Backend::$variant;
                    let db = $crate::TestDb::new(backend, stringify!($case)).await;
                    crate::$case(db.clone()).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

/// The backends the invoking crate was compiled with, as a `Vec<Backend>`: those of its
/// cargo features `sqlite`, `postgres` and `mysql` that are on (read where the macro is
/// invoked, as [`backend_tests!`] reads them).
#[macro_export]
macro_rules! compiled_backends {
    () => {
        $crate::Backend::of_features(
            cfg!(feature = "sqlite"),
            cfg!(feature = "postgres"),
            cfg!(feature = "mysql"),
        )
    };
}

/// Runs a server's control command (as `scripts/test-all` exports them for the outage
/// tests: `APIKEYS_OUTAGE_*_CTL`) with `{}` replaced by `action` (`stop` or `start`).
///
/// # Panics
/// If the command cannot be run or fails.
pub async fn server_ctl(command: &str, action: &str) {
    let command = command.replace("{}", action);
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh").arg("-c").arg(&command).status().expect("run ctl")
    })
    .await
    .unwrap();
    assert!(status.success(), "server {action} failed");
}
