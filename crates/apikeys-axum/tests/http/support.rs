//! Serving an app on loopback, and reading problem answers.

use apikeys_db::ApiKeyClient;
use apikeys_db::core::find_keys;
use axum::Router;
use reqwest::Response;
use serde_json::Value;

/// Serves `app` on a loopback port; returns its base URL.
pub async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Serves `app` on a loopback port with each connection's peer address in the request
/// extensions (axum's `ConnectInfo`), as a host whose keys have IP allowlists does.
pub async fn serve_with_peer(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    format!("http://{addr}")
}

/// The status, headers and JSON body of an answer.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    pub async fn of(response: Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self { status, headers, body, text }
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
    }

    /// Asserts an RFC 9457 problem with this status and code that never mentions `key`, nor
    /// anything else shaped like a key (in its body or headers).
    pub fn assert_problem(&self, status: u16, code: &str, key: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.header("content-type"), "application/problem+json", "{}", self.text);
        assert_eq!(self.body["status"], status, "{}", self.text);
        assert_eq!(self.body["code"], code, "{}", self.text);
        assert!(self.body["title"].is_string() && self.body["detail"].is_string(), "{}", self.text);
        assert!(find_keys(self.text.as_bytes()).is_empty(), "a key in the body: {}", self.text);
        let headers = format!("{:?}", self.headers);
        assert!(find_keys(headers.as_bytes()).is_empty(), "a key in a header: {headers}");
        if !key.is_empty() {
            assert!(!self.text.contains(key), "the body echoes the key: {}", self.text);
            assert!(!format!("{:?}", self.headers).contains(key), "a header echoes the key");
        }
    }
}

pub async fn fetch(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = reqwest::Client::new().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Answer::of(request.send().await.unwrap()).await
}

/// A key of `org` with these scopes (and rate limit), as plaintext and id.
pub async fn key(
    client: &ApiKeyClient,
    org: apikeys_db::OrgId,
    new: apikeys_db::NewKey,
) -> (String, apikeys_db::KeyId) {
    let issued = client.create_key(org, new).await.unwrap();
    (issued.key.expose_secret().to_owned(), issued.record.id)
}
