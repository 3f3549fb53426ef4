//! The integration suite, stamped out for SQLite, PostgreSQL and MySQL/MariaDB.
//!
//! PostgreSQL and MySQL are compiled in with their cargo features, and then need
//! `APIKEYS_TEST_POSTGRES_URL` / `APIKEYS_TEST_MYSQL_URL` (the user must be allowed to create
//! databases): a missing URL fails their tests. Filter one backend with `cargo test -p apikeys-db --test suite
//! postgres::` (or `cargo nextest run -E 'test(/::mysql::/)'`).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bad_input;
mod bootstrap;
mod cache;
mod concurrency;
mod costs;
mod fuzz;
mod key_admin;
mod keys;
mod leased_credits;
mod leases;
mod lifecycle;
mod named_limits;
#[cfg(feature = "redis")]
mod on_redis;
mod owners;
mod races;
mod rate_limit;
mod revocation;
mod rotation;
mod roundtrip;
mod switch;
mod tenancy;
mod test_db;
mod timeout;
mod transaction;
mod usage;
mod warm;

apikeys_testing::backend_tests! {
    bad_input: [
        bad_input_table,
    ],
    bootstrap: [
        organization_get_or_create_is_idempotent,
        create_duplicate_reports_existing_id,
        projects_and_products,
        names_up_to_255_characters,
        names_are_exact_on_every_backend,
        product_links,
    ],
    keys: [
        create_and_verify,
        usage_tracking,
        invalid_keys,
        revoke_and_delete,
        expiry,
        product_rule,
        scopes,
        update_metadata,
        metadata_round_trip,
    ],
    key_admin: [
        listing_and_pagination,
        default_lifetime,
        ids_follow_the_client_clock,
    ],
    transaction: [
        host_transaction_commit_and_rollback,
        failed_calls_leave_the_host_transaction_usable,
        key_changes_follow_the_host_transaction,
        concurrent_host_transactions_create_one_row,
        isolation_as_documented,
    ],
    warm: [
        warming_loads_the_live_keys_and_no_other,
        warmed_keys_follow_changes_made_elsewhere,
        warming_racing_revocations_never_serves_a_revoked_key,
        warming_counts_what_the_cache_holds,
        warming_stops_at_the_cache_room,
        warming_needs_a_cache,
        warming_leaves_out_keys_under_a_previous_secret,
    ],
    cache: [
        checks_are_served_from_memory,
        the_same_client_sees_its_changes_at_once,
        other_clients_see_changes_within_the_bound,
        unknown_keys_are_remembered_but_never_as_valid,
        a_flood_of_unknown_keys_leaves_real_keys_working,
        a_failing_feed_stops_the_cache,
        rehash_refreshes_the_cached_entry,
        the_cache_holds_at_most_max_keys,
        a_client_behind_the_purged_feed_empties_its_cache,
        purge_change_feed_keeps_the_newest_row,
    ],
    revocation: [
        churn_never_loses_a_revocation,
        a_feed_that_went_back_is_noticed,
        a_writer_behind_and_a_purge_leave_no_hole,
        a_slow_feed_with_stale_if_error_keeps_serving,
        a_busy_pool_is_not_an_outage,
        host_transactions_hold_what_is_documented,
        a_feed_row_of_an_unknown_kind_empties_the_cache,
        a_key_the_database_lost_can_still_be_revoked,
        a_purge_after_a_quiet_spell_keeps_readers_in_place,
    ],
    concurrency: [
        concurrent_bootstrap,
    ],
    rotation: [
        rolling_rotation_and_rollback,
        a_mislabelled_secret_is_refused,
        failed_rehash_never_fails_the_check,
        schema_upgrade_keeps_keys,
        secret_rotation,
    ],
    races: [
        admin_calls_racing_the_hot_path,
    ],
    lifecycle: [
        adding_credits_is_atomic_and_follows_the_refill,
        roll_keeps_the_old_key_for_its_grace,
        other_replicas_refuse_rolled_revoked_and_spent_keys,
        credits_are_spent_and_refilled_once_per_period,
        credits_are_exact_under_concurrency,
        owners_and_expiring_keys,
        renew_and_extend,
        audit_trail,
        upgrade_to_the_lifecycle_schema,
        rolled_keys_share_one_rate_limit_budget,
        zero_grace_roll_is_a_revocation,
        owners_are_per_organization,
        rolled_keys_are_not_renewed_or_listed_as_expiring,
        a_skewed_clock_cannot_move_the_credit_period,
        upgrade_to_per_organization_owners_and_lineage,
    ],
    timeout: [
        stuck_statement_is_unavailable,
    ],
    tenancy: [
        cross_tenant_isolation,
    ],
    roundtrip: [
        arbitrary_names_and_json_round_trip,
        whole_floats_read_back_as_the_same_integers_everywhere,
    ],
    fuzz: [
        verify_arbitrary_input,
    ],
    test_db: [
        a_panicking_test_drops_its_database,
    ],
    usage: [
        batched_counts_are_exact,
        batched_flushes_on_interval_and_shutdown,
        last_used_only_moves_forward,
    ],
    rate_limit: [
        shared_limit_is_exact_under_concurrency,
        window_rollover_by_database_clock,
        purge_keeps_windows_that_can_still_be_counted,
        skewed_clocks_share_one_window,
        keys_and_calls_are_independent,
        update_takes_effect_on_next_check,
        local_mode,
        leased_limit_is_exact_under_concurrency,
        leased_units_are_given_back_on_shutdown,
        leased_give_back_after_a_limit_raise_never_over_admits,
    ],
    leased_credits: [
        leased_credits_are_exact_across_clients,
        leased_credits_go_back_on_shutdown,
        a_balance_set_again_drops_the_blocks_held,
        held_credits_never_go_back_into_a_new_period,
        a_stale_record_never_mixes_two_balances,
        a_spent_balance_is_refused_from_memory_until_the_key_changes,
        a_top_up_keeps_the_blocks_replicas_hold,
    ],
    switch: [
        a_disabled_key_is_refused_until_enabled,
        other_replicas_see_disable_enable_and_allowlists,
        ip_allowlists_are_checked_before_any_counter,
        disable_and_enable_racing_checks,
        disable_in_a_host_transaction,
        upgrade_to_disable_and_ip_allowlists,
        keys_in_grace_follow_their_successor,
    ],
    costs: [
        costs_take_units_all_or_nothing,
        a_check_refused_for_credits_spends_no_rate_limit_unit,
        costs_and_credits_are_exact_under_concurrency,
        an_expensive_refused_check_holds_no_units,
    ],
    named_limits: [
        named_limits_are_all_or_nothing,
        a_named_refusal_takes_nothing_from_the_main_limit,
        named_limits_are_exact_under_concurrency,
        rolled_keys_share_named_limits,
        upgrade_to_named_limits,
        named_limits_in_local_mode_and_changed_windows,
    ],
    owners: [
        owner_limits_are_shared_by_its_keys_and_rolls,
        owner_credits_are_all_or_nothing,
        leased_owner_credits_are_all_or_nothing,
        owner_plans_are_exact_under_concurrency,
        owner_plan_changes_reach_cached_replicas,
        owner_plans_are_managed,
        upgrade_to_owner_plans,
        owner_plan_writes_race_cleanly,
        keys_created_during_a_plan_change_see_it,
        a_change_of_limits_keeps_give_backs,
        warmed_caches_and_local_mode_hold_owner_plans,
    ],
    leases: [
        a_steady_key_is_answered_from_units_reserved_ahead,
        the_next_window_is_reserved_ahead_for_an_active_key,
        leased_shortfall_is_bounded,
        reservations_asked_together_share_statements,
        a_key_deleted_in_a_batch_fails_only_its_own_check,
    ],
}

// Shared rate limits counted in Redis: the SQL cases that hold for any store, again, and
// Redis's own.
apikeys_testing::redis_tests! {
    rate_limit: [
        shared_limit_is_exact_under_concurrency,
        keys_and_calls_are_independent,
        update_takes_effect_on_next_check,
        leased_limit_is_exact_under_concurrency,
    ],
    lifecycle: [
        rolled_keys_share_one_rate_limit_budget,
    ],
    costs: [
        costs_take_units_all_or_nothing,
        a_check_refused_for_credits_spends_no_rate_limit_unit,
        costs_and_credits_are_exact_under_concurrency,
        an_expensive_refused_check_holds_no_units,
    ],
    named_limits: [
        named_limits_are_all_or_nothing,
        a_named_refusal_takes_nothing_from_the_main_limit,
        named_limits_are_exact_under_concurrency,
        rolled_keys_share_named_limits,
    ],
    owners: [
        owner_limits_are_shared_by_its_keys_and_rolls,
        owner_plans_are_exact_under_concurrency,
    ],
    on_redis: [
        windows_by_redis_clock_under_skewed_clients,
        fails_closed_while_redis_is_out_of_reach_and_recovers,
        redis_url_password_is_never_printed,
        lineage_holds_along_chains_of_rolls_and_deletes,
        a_window_never_goes_back_when_the_redis_clock_does,
        change_notices_wake_other_replicas,
        lost_notices_cost_nothing,
        notice_settings_are_checked_and_never_print_the_password,
    ],
}
