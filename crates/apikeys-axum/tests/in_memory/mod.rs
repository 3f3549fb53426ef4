//! A client on an in-memory SQLite database, with one key.

use apikeys_db::{ApiKeyClient, NewKey};

/// The client and the plaintext of a key of organization `acme`.
pub async fn client_and_key() -> (ApiKeyClient, String) {
    let client = ApiKeyClient::builder()
        .database_url("sqlite::memory:")
        .signing_secret("a-signing-secret-of-at-least-32-bytes!!")
        .build()
        .await
        .unwrap();
    client.create_tables().await.unwrap();
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued = client.create_key(org.id, NewKey::new("k")).await.unwrap();
    (client, issued.key.expose_secret().to_owned())
}
