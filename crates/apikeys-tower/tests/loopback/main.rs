//! The tower guard through real requests on loopback: a plain hyper service (problem
//! answers) and a tonic gRPC service (the `tonic_server` example, gRPC statuses), on SQLite,
//! PostgreSQL and MariaDB.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod grpc;
mod hyper_service;

/// The workspace's tonic example, whose `serve` and answer mapping these tests call.
#[path = "../../../../examples/tonic_server.rs"]
#[allow(dead_code, unreachable_pub)]
mod tonic_example;

apikeys_testing::backend_tests! {
    hyper_service: [
        a_valid_key_reaches_the_service_with_the_key_in_its_extensions,
        rejections_are_problems_that_never_echo_the_key,
        over_the_limit_is_429_with_retry_after_and_ratelimit_headers,
        ip_allowlists_judge_the_peer_the_server_put_in_the_extensions,
        a_revoke_is_seen_by_the_next_request,
    ],
    grpc: [
        a_valid_key_in_metadata_or_as_bearer_is_served,
        no_bad_or_revoked_keys_are_unauthenticated,
        missing_scopes_and_foreign_addresses_are_permission_denied,
        over_the_limit_is_resource_exhausted_with_retry_info,
        a_database_outage_is_unavailable_with_retry_info,
        spent_credits_are_resource_exhausted_without_a_wait,
    ],
}
