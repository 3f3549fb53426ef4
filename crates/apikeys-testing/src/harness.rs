//! For the test binaries that are their own harness (they spawn copies of themselves as
//! worker processes, so libtest cannot run them).

use crate::db::{Backend, TestDb};

/// Runs every case on a fresh database of each of `backends` (usually
/// [`compiled_backends!`](crate::compiled_backends)), prints libtest-style lines, and exits
/// with 1 if any case failed (or none ran). A case runs in a task of its own: its panic is
/// its failure, and its database is dropped either way.
#[allow(clippy::print_stdout)] // the harness's report
pub async fn run_cases<C, F, Fut>(backends: &[Backend], test: &str, cases: &[(&str, C)], run: F)
where
    C: Copy,
    F: Fn(C, TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (mut passed, mut failed) = (0, 0);
    for &backend in backends {
        for (name, case) in cases {
            let db = TestDb::new(backend, test).await;
            let result = tokio::spawn(run(*case, db.clone())).await;
            db.cleanup().await;
            match result {
                Ok(()) => {
                    println!("test {backend:?}::{name} ... ok");
                    passed += 1;
                }
                Err(e) => {
                    println!("test {backend:?}::{name} ... FAILED: {e}");
                    failed += 1;
                }
            }
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 || passed == 0 {
        std::process::exit(1);
    }
}
