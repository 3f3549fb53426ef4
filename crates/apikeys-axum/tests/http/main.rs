//! The guard and the management API through real HTTP: each app is served on a loopback
//! socket and called with reqwest, on SQLite, PostgreSQL and MariaDB.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod guard;
mod manage;
mod support;

apikeys_testing::backend_tests! {
    guard: [
        header_and_bearer_keys_reach_the_handler,
        no_key_is_401_with_a_challenge,
        invalid_expired_and_revoked_keys_are_401,
        wrong_scope_and_wrong_product_are_403,
        over_the_limit_is_429_with_retry_after_and_ratelimit_headers,
        query_parameter_only_when_turned_on,
        rejections_never_echo_what_was_presented,
        typed_requirements_and_optional_keys,
        a_layer_and_an_extractor_count_a_request_once,
        a_plain_key_after_a_typed_one_still_meets_the_defaults,
        database_failures_are_503_and_500_without_details,
        a_revoke_through_the_api_is_seen_by_a_caching_guard,
        admin_calls_racing_guarded_requests_end_in_documented_answers,
        ip_allowlists_judge_the_peer_and_only_trusted_forwarding,
        a_disable_and_enable_reach_a_caching_guard,
    ],
    manage: [
        the_router_refuses_requests_its_admin_check_refuses,
        organizations_projects_and_products_end_to_end,
        keys_end_to_end,
        listing_filters_by_status_and_pages,
        bad_input_is_a_problem_and_changes_nothing,
        values_that_do_not_parse_are_never_echoed,
        the_openapi_document_describes_every_route,
        create_takes_every_option_of_new_key,
        create_refuses_unknown_members_and_bad_values,
        disable_and_enable_through_the_api,
        ip_allowlists_through_the_api,
        roll_renew_events_and_owners_through_the_api,
        admins_bound_to_an_organization_stay_in_it,
        credits_are_topped_up_through_the_api,
        listings_come_a_page_at_a_time,
        owner_plans_through_the_api,
    ],
}
