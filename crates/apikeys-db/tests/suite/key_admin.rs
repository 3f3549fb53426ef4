//! Listing keys, ids from the client's clock, the default key lifetime.

use std::time::Duration;

use apikeys_db::{Error, NewKey, Page, StatusFilter};
use chrono::TimeDelta;

use crate::keys::org;
use apikeys_testing::{TestClock, TestDb, at};

pub async fn listing_and_pagination(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let acme = org(&client, "acme").await;
    let globex = org(&client, "globex").await;
    let (v1, _) = client.get_or_create_project(acme, "v1").await.unwrap();
    let (v2, _) = client.get_or_create_project(acme, "v2").await.unwrap();
    assert_eq!(
        client
            .list_project_keys(v1.id, StatusFilter::All, Page::first(10).unwrap())
            .await
            .unwrap()
            .items
            .len(),
        0
    );

    let mut v1_keys = Vec::new();
    for i in 0..7 {
        let mut nk = NewKey::new(format!("k{i}")).with_project(v1.id);
        if i == 5 {
            nk = nk.expires_at(clock.now() + TimeDelta::hours(1));
        }
        v1_keys.push(client.create_key(acme, nk).await.unwrap().record.id);
    }
    client.create_key(acme, NewKey::new("v2").with_project(v2.id)).await.unwrap();
    client.create_key(acme, NewKey::new("orgwide")).await.unwrap();
    client.create_key(globex, NewKey::new("foreign")).await.unwrap();
    client.revoke_key(v1_keys[2]).await.unwrap();
    clock.advance(TimeDelta::hours(2)); // key 5 is now expired

    // Pages of 3 over 7 keys: 3, 3, 1; exactly-full last page has no cursor.
    let mut seen = Vec::new();
    let mut page = Page::first(3).unwrap();
    let mut sizes = Vec::new();
    loop {
        let p = client.list_project_keys(v1.id, StatusFilter::All, page).await.unwrap();
        sizes.push(p.items.len());
        seen.extend(p.items.iter().map(|k| k.id));
        match p.next {
            Some(cursor) => page = Page::first(3).unwrap().after(cursor),
            None => break,
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, v1_keys);
    let exact =
        client.list_project_keys(v1.id, StatusFilter::All, Page::first(7).unwrap()).await.unwrap();
    assert_eq!((exact.items.len(), exact.next), (7, None));
    let short =
        client.list_project_keys(v1.id, StatusFilter::All, Page::first(6).unwrap()).await.unwrap();
    assert_eq!(short.next, Some(v1_keys[5]));

    let ids = |f| {
        let client = client.clone();
        async move {
            client
                .list_project_keys(v1.id, f, Page::first(100).unwrap())
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|k| k.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids(StatusFilter::Revoked).await, [v1_keys[2]]);
    assert_eq!(ids(StatusFilter::Expired).await, [v1_keys[5]]);
    let active: Vec<_> =
        v1_keys.iter().copied().filter(|k| *k != v1_keys[2] && *k != v1_keys[5]).collect();
    assert_eq!(ids(StatusFilter::Active).await, active);

    let org_keys =
        client.list_org_keys(acme, StatusFilter::All, Page::first(100).unwrap()).await.unwrap();
    assert_eq!(org_keys.items.len(), 9);
    assert!(org_keys.items.iter().all(|k| k.org_id == acme), "no other tenant's keys");
    assert_eq!(
        client.list_org_keys(globex, StatusFilter::All, Page::default()).await.unwrap().items.len(),
        1
    );
    // Checked when the page is built, so a listing cannot fail for it.
    for bad in [0, 1001] {
        assert!(matches!(Page::first(bad), Err(Error::InvalidInput { field: "page.limit", .. })));
    }
}

/// Ids are minted from the client's clock: under an injected clock, id order and `created_at`
/// agree, and the id's timestamp is `created_at`'s millisecond.
pub async fn ids_follow_the_client_clock(db: TestDb) {
    let clock = TestClock::at(at("2031-05-06T07:08:09.123Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    for step in [0, -3_600_000, 1, 86_400_000] {
        clock.advance(TimeDelta::milliseconds(step));
        keys.push(client.create_key(org.id, NewKey::new("k")).await.unwrap().record);
    }
    for key in &keys {
        let (secs, nanos) = key.id.as_uuid().get_timestamp().unwrap().to_unix();
        let ms = i64::try_from(secs).unwrap() * 1000 + i64::from(nanos / 1_000_000);
        assert_eq!(ms, key.created_at.timestamp_millis(), "{key:?}");
    }
    let org_ms = org.id.as_uuid().get_timestamp().unwrap().to_unix().0;
    assert_eq!(i64::try_from(org_ms).unwrap(), at("2031-05-06T07:08:09Z").timestamp());
    // Listing is by id: the key created an hour "earlier" comes first.
    let listed =
        client.list_org_keys(org.id, StatusFilter::All, Page::default()).await.unwrap().items;
    let mut by_time = keys.clone();
    by_time.sort_by_key(|k| k.created_at);
    assert_eq!(
        listed.iter().map(|k| k.id).collect::<Vec<_>>(),
        by_time.iter().map(|k| k.id).collect::<Vec<_>>()
    );
}

pub async fn default_lifetime(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client = db
        .client_with(|b| {
            b.clock(clock.as_fn()).default_key_lifetime(Duration::from_secs(90 * 86_400))
        })
        .await;
    let org = org(&client, "acme").await;
    let k = client.create_key(org, NewKey::new("k")).await.unwrap();
    assert_eq!(k.record.expires_at, Some(clock.now() + TimeDelta::days(90)));
    let forever = client.create_key(org, NewKey::new("f").never_expires()).await.unwrap();
    assert_eq!(forever.record.expires_at, None);
}
