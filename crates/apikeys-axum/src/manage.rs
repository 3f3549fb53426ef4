//! The management API: keys, organizations, projects and products over HTTP, with its
//! OpenAPI document.

use apikeys_db::core::find_keys;
use apikeys_db::{
    ApiKey, ApiKeyClient, Credits, Error, IpAllowlist, IssuedKey, KeyEvent, KeyId, KeyPage,
    KeyUpdate, NewKeyInput, OrgId, Organization, Owner, OwnerPlan, Page, Product, ProductId,
    Project, ProjectId, RateLimit, RateLimits, RecordId, StatusFilter,
};
use apikeys_http::{ErrorMapper, Problem};
use axum::extract::path::ErrorKind as PathErrorKind;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::Route;
use axum::{Json, Router};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use tower::{Layer, Service};
use utoipa::openapi::OpenApi;
use utoipa::openapi::server::Server;
use utoipa::{IntoParams, OpenApi as _, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::problem_response;

/// The management API as an axum [`Router`](axum::Router), to mount behind the host's own admin
/// authentication: [`authorized_as`](Self::authorized_as) takes a check that says which
/// [`Admin`] calls (of every organization or of one, named in the audit trail),
/// [`authorized_by`](Self::authorized_by) a tower layer and
/// [`authorized_by_fn`](Self::authorized_by_fn) a yes-or-no check, and there is no way to
/// get the router without one of them.
///
/// | method and path | what it does |
/// |---|---|
/// | `POST /orgs`, `GET /orgs`, `GET /orgs/{org_id}` | create, list, get organizations |
/// | (every listing) | a page at a time: `?limit=100&after={id}`, answered `{"items": [...], "next": id or null}` |
/// | `POST /orgs/{org_id}/projects`, `GET /orgs/{org_id}/projects`, `GET /projects/{project_id}` | projects |
/// | `POST /orgs/{org_id}/products`, `GET /orgs/{org_id}/products`, `GET /products/{product_id}` | products |
/// | `PUT`, `DELETE /projects/{project_id}/products/{product_id}`, `GET /projects/{project_id}/products` | link, unlink, list a project's products |
/// | `POST /orgs/{org_id}/keys` | create a key: the plaintext is in this answer only |
/// | `GET /orgs/{org_id}/keys`, `GET /projects/{project_id}/keys` | list keys: `?status=active\|revoked\|expired\|disabled\|all&limit=100&after={key_id}` |
/// | `GET`, `PATCH`, `DELETE /keys/{key_id}`, `POST /keys/{key_id}/revoke` | get, update, delete, revoke a key |
/// | `POST /keys/{key_id}/disable`, `POST /keys/{key_id}/enable` | disable a key, enable it again |
/// | `POST /keys/{key_id}/roll` | replace a key (the new plaintext is in this answer only); the old one works for `grace_seconds` |
/// | `POST /keys/{key_id}/renew` | move a key's expiry: to `expires_at`, or `extend_by_seconds` later |
/// | `GET /keys/{key_id}/events` | a key's audit trail |
/// | `POST /keys/{key_id}/credits` | add credits to a key's balance (`{"add": n}`) |
/// | `GET /orgs/{org_id}/owners/{owner_id}/keys`, `POST /orgs/{org_id}/owners/{owner_id}/revoke` | an owner's keys: list, revoke all |
/// | `GET /orgs/{org_id}/owners`, `GET`, `PUT`, `PATCH`, `DELETE /orgs/{org_id}/owners/{owner_id}` | owners' plans (limits and credits their keys share): list, get, set whole, set the limits only, delete |
/// | `POST /orgs/{org_id}/owners/{owner_id}/credits` | add credits to an owner's balance (`{"add": n}`) |
///
/// Errors are RFC 9457 problems ([`apikeys_http`]): 404 for an unknown id, 409 for a name
/// taken, a key already rolled, or a key whose state forbids the call (code `revoked`,
/// `expired` or `disabled`; never the 401 the guard gives a caller), 422 for a rejected value (with the field), 400 for a request that does not
/// parse (422 for JSON of the wrong shape), 503 when the database is unreachable. Answers
/// that hold a plaintext key carry `Cache-Control: no-store`.
///
/// A problem names the field, never the value: a path or query parameter or body member
/// that does not parse is named in `field` (`key_id`, `after`, `rate_limit.window`), and
/// nothing the request sent is repeated, so a key pasted where an id belongs
/// (`GET /keys/sk_…`) is not echoed back into logs, proxies or the caller's error reports.
/// A member a body does not take is refused (422) and named in `field` when its name is
/// shaped like this API's names (`owner`, `credits.refil`); one of any other shape (a key,
/// a token) is refused without its name.
///
/// The body of `POST /orgs/{org_id}/keys` is [`NewKeyInput`](apikeys_db::NewKeyInput): every
/// option of `NewKey`, owner and credits included.
///
/// ```
/// use apikeys_axum::ManagementApi;
/// # async fn demo(client: apikeys_db::ApiKeyClient) {
/// let admin_token = std::env::var("ADMIN_TOKEN").unwrap_or_default();
/// let admin = ManagementApi::new(client)
///     .openapi_at("/openapi.json")
///     .authorized_by_fn(move |parts| {
///         // Your admin authentication; compare secrets in constant time in real code.
///         parts.headers.get("x-admin-token").is_some_and(|t| !admin_token.is_empty() && t == admin_token.as_str())
///     });
/// let app: axum::Router = axum::Router::new().nest("/admin", admin);
/// # }
/// ```
///
/// Without authorization it does not compile:
/// ```compile_fail
/// # fn demo(client: apikeys_db::ApiKeyClient) {
/// let app: axum::Router = axum::Router::new().nest("/admin", apikeys_axum::ManagementApi::new(client));
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a ManagementApi does nothing until it is turned into a router with authorized_by"]
pub struct ManagementApi {
    client: ApiKeyClient,
    openapi_path: Option<String>,
    base_path: Option<String>,
}

impl ManagementApi {
    /// The management API of `client`'s store.
    pub fn new(client: ApiKeyClient) -> Self {
        Self { client, openapi_path: None, base_path: None }
    }

    /// Also serves the OpenAPI document (JSON) at `path`, inside the router and so behind
    /// the same admin authorization. To serve it elsewhere, use [`openapi`](Self::openapi).
    pub fn openapi_at(mut self, path: impl Into<String>) -> Self {
        self.openapi_path = Some(path.into());
        self
    }

    /// The path the host nests the router at (`/admin`), written into the OpenAPI
    /// document's `servers` so that its paths resolve.
    pub fn nested_at(mut self, path: impl Into<String>) -> Self {
        self.base_path = Some(path.into());
        self
    }

    /// The OpenAPI 3.1 document of the management API.
    #[must_use]
    pub fn openapi(&self) -> OpenApi {
        self.split().1
    }

    fn split(&self) -> (Router<ApiKeyClient>, OpenApi) {
        let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
            .routes(routes!(create_org, list_orgs))
            .routes(routes!(get_org))
            .routes(routes!(create_project, list_projects))
            .routes(routes!(get_project))
            .routes(routes!(create_product, list_products))
            .routes(routes!(get_product))
            .routes(routes!(link_product, unlink_product))
            .routes(routes!(list_project_products))
            .routes(routes!(create_key, list_org_keys))
            .routes(routes!(list_project_keys))
            .routes(routes!(get_key, update_key, delete_key))
            .routes(routes!(revoke_key))
            .routes(routes!(disable_key))
            .routes(routes!(enable_key))
            .routes(routes!(roll_key))
            .routes(routes!(renew_key))
            .routes(routes!(list_key_events))
            .routes(routes!(add_credits))
            .routes(routes!(list_owner_keys))
            .routes(routes!(revoke_owner_keys))
            .routes(routes!(list_owners))
            .routes(routes!(get_owner, set_owner, set_owner_limits, delete_owner))
            .routes(routes!(add_owner_credits))
            .split_for_parts();
        if let Some(base) = &self.base_path {
            doc.servers = Some(vec![Server::new(base.clone())]);
        }
        (router, doc)
    }

    /// The router, with every route behind `admin`: the host's authentication layer (an
    /// axum `middleware::from_fn`, tower-http's `ValidateRequestHeaderLayer`, axum-login's
    /// guard, ...). Requests it turns away never reach the store.
    pub fn authorized_by<L>(self, admin: L) -> Router
    where
        L: Layer<Route> + Clone + Send + Sync + 'static,
        L::Service: Service<Request> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request>>::Response: IntoResponse + 'static,
        <L::Service as Service<Request>>::Error: Into<std::convert::Infallible> + 'static,
        <L::Service as Service<Request>>::Future: Send + 'static,
    {
        let (mut router, doc) = self.split();
        if let Some(path) = &self.openapi_path {
            router = router.route(path, axum::routing::get(move || async move { Json(doc) }));
        }
        router.layer(admin).with_state(self.client)
    }

    /// The router, with every route behind `admin`: the host's check, which says who the
    /// caller is ([`Admin`]: of every organization or one, and the name the audit trail
    /// records), or `None` for a request it turns away: that is answered 403 (an RFC 9457
    /// problem, code `forbidden`) and never reaches the store.
    ///
    /// ```
    /// use apikeys_axum::{Admin, ManagementApi};
    /// # async fn demo(client: apikeys_db::ApiKeyClient, acme: apikeys_db::OrgId) {
    /// let admin = ManagementApi::new(client).authorized_as(move |parts| {
    ///     // Your admin authentication; compare secrets in constant time in real code.
    ///     match parts.headers.get("x-admin-token")?.to_str().ok()? {
    ///         "global-token" => Admin::global().named("ops").ok(),
    ///         "acme-token" => Admin::of_org(acme).named("acme-admin").ok(),
    ///         _ => None,
    ///     }
    /// });
    /// let app: axum::Router = axum::Router::new().nest("/admin", admin);
    /// # }
    /// ```
    pub fn authorized_as<F>(self, admin: F) -> Router
    where
        F: Fn(&Parts) -> Option<Admin> + Clone + Send + Sync + 'static,
    {
        self.authorized_by(middleware::from_fn(move |request: Request, next: Next| {
            let (mut parts, body) = request.into_parts();
            let found = admin(&parts);
            async move {
                match found {
                    Some(admin) => {
                        parts.extensions.insert(admin);
                        next.run(Request::from_parts(parts, body)).await
                    }
                    None => problem_response(ErrorMapper::new().forbidden()),
                }
            }
        }))
    }

    /// The router, with every route behind `check`: a request for which it returns false
    /// is answered 403 (an RFC 9457 problem, code `forbidden`) and never reaches the store.
    /// Those it lets through act as an unnamed global [`Admin`].
    pub fn authorized_by_fn<F>(self, check: F) -> Router
    where
        F: Fn(&Parts) -> bool + Clone + Send + Sync + 'static,
    {
        self.authorized_by(middleware::from_fn(move |request: Request, next: Next| {
            let allowed = {
                let (parts, body) = request.into_parts();
                let allowed = check(&parts);
                (allowed, Request::from_parts(parts, body))
            };
            async move {
                match allowed {
                    (true, request) => next.run(request).await,
                    (false, _) => problem_response(ErrorMapper::new().forbidden()),
                }
            }
        }))
    }
}

/// Who calls the management API, as the host's authentication says: an admin of every
/// organization or of one, and the name the audit trail records for what they change.
///
/// [`ManagementApi::authorized_as`] gets one per request from the host's check; a layer
/// given to [`ManagementApi::authorized_by`] may put one in the request's extensions
/// instead. A request that has none acts as an unnamed global admin.
///
/// An admin of one organization works in it alone: records of any other organization are
/// answered 404 (`not_found`), as if they did not exist, and nothing of theirs is changed;
/// `GET /orgs` lists its own organization only, and creating an organization is 403
/// (`forbidden`).
///
/// ```
/// use apikeys_axum::Admin;
/// # fn demo(org: apikeys_db::OrgId) -> apikeys_db::Result<()> {
/// let support = Admin::global().named("support:alice")?;
/// let tenant = Admin::of_org(org).named("acme-admin:bob")?;
/// assert_eq!((support.org(), tenant.org()), (None, Some(org)));
/// assert!(Admin::global().named("  ").is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admin {
    org: Option<OrgId>,
    actor: Option<String>,
}

impl Admin {
    /// An admin of every organization.
    #[must_use]
    pub fn global() -> Self {
        Self::default()
    }

    /// An admin of `org` alone.
    #[must_use]
    pub fn of_org(org: OrgId) -> Self {
        Self { org: Some(org), actor: None }
    }

    /// The name recorded as the actor of every key change this admin makes (see
    /// [`ApiKeyClient::acting_as`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `actor`): 1 to 255 characters, no leading or trailing
    /// whitespace, no control or invisible format characters.
    pub fn named(mut self, actor: impl Into<String>) -> Result<Self, Error> {
        let actor = actor.into();
        apikeys_db::core::hazmat::validate_actor(&actor)?;
        self.actor = Some(actor);
        Ok(self)
    }

    /// The organization this admin is bound to (`None`: every one).
    #[must_use]
    pub fn org(&self) -> Option<OrgId> {
        self.org
    }

    /// The name the audit trail records.
    #[must_use]
    pub fn actor(&self) -> Option<&str> {
        self.actor.as_deref()
    }
}

/// The admin a handler acts as: the store client (naming the admin in the audit trail) and
/// the organization the admin is bound to. Every record a handler touches passes one of its
/// checks first.
struct Acting {
    client: ApiKeyClient,
    org: Option<OrgId>,
}

impl FromRequestParts<ApiKeyClient> for Acting {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiKeyClient) -> Result<Self, ApiError> {
        let admin = parts.extensions.get::<Admin>().cloned().unwrap_or_default();
        let client = match admin.actor() {
            Some(actor) => state.acting_as(actor)?,
            None => state.clone(),
        };
        Ok(Self { client, org: admin.org })
    }
}

impl Acting {
    /// `Ok` when this admin may act in `org`; else the record `id` is not found for them.
    fn within(&self, org: OrgId, id: impl Into<RecordId>) -> Result<(), ApiError> {
        match self.org {
            Some(own) if own != org => Err(Error::NotFound { id: id.into() }.into()),
            _ => Ok(()),
        }
    }

    /// `Ok` for a global admin.
    fn global(&self) -> Result<(), ApiError> {
        if self.org.is_some() { Err(ApiError::Forbidden) } else { Ok(()) }
    }

    async fn org(&self, id: OrgId) -> Result<Organization, ApiError> {
        self.within(id, id)?;
        Ok(self.client.get_organization(id).await?)
    }

    async fn project(&self, id: ProjectId) -> Result<Project, ApiError> {
        let project = self.client.get_project(id).await?;
        self.within(project.org_id, id)?;
        Ok(project)
    }

    async fn product(&self, id: ProductId) -> Result<Product, ApiError> {
        let product = self.client.get_product(id).await?;
        self.within(product.org_id, id)?;
        Ok(product)
    }

    async fn key(&self, id: KeyId) -> Result<ApiKey, ApiError> {
        let key = self.client.get_key(id).await?;
        self.within(key.org_id, id)?;
        Ok(key)
    }
}

/// A store error as the management API's answer (logged at `ERROR` when it is a 5xx), or a
/// call this admin may not make.
enum ApiError {
    Store(Error),
    /// An admin of one organization asked for what only a global admin may do.
    Forbidden,
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self::Store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = match self {
            ApiError::Store(error) => error,
            ApiError::Forbidden => return problem_response(ErrorMapper::new().forbidden()),
        };
        let mut answer = ErrorMapper::new().response(&error);
        if let Error::Revoked { .. } | Error::Expired { .. } | Error::Disabled { .. } = error {
            // The admin's call is fine; the key's state forbids it (enabling a revoked key,
            // rolling an expired one). Not a 401: that would say the admin is not
            // authenticated.
            answer.status = StatusCode::CONFLICT;
            answer.problem.status = StatusCode::CONFLICT.as_u16();
            answer.problem.title = "Conflict".into();
            answer.headers.remove(header::WWW_AUTHENTICATE);
        }
        if answer.status.is_server_error() {
            tracing::error!(error = &error as &dyn std::error::Error, "management api call failed");
        }
        problem_response(answer)
    }
}

/// A request that does not parse, as a 400 (or 413, 415, 422) problem: code `bad_request`,
/// `field` naming the part that does not parse when it is known (a path or query parameter,
/// a body member such as `rate_limit.window` or `scopes[1]`), and a detail that says what
/// is wrong with it. Neither ever repeats a value of the request: the value given where an
/// id belongs is most often a key pasted by mistake. A member or parameter this API does not
/// take is named only when its name is shaped like this API's own (lowercase letters and
/// underscores: a typo such as `owner` for `owner_id`), since its name is the client's text
/// too. axum's own rejection texts quote values, so they are never used.
struct BadRequest(Response);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        self.0
    }
}

impl BadRequest {
    fn new(status: StatusCode, field: Option<String>, detail: String) -> Self {
        let mut answer = ErrorMapper::new().bad_request(status, detail);
        answer.problem.field = field;
        Self(problem_response(answer))
    }

    /// A path that does not parse; `names` are the route's parameter names, in order.
    fn path(rejection: &PathRejection, names: &[String]) -> Self {
        let status = rejection.status();
        let name = match rejection {
            PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
                PathErrorKind::ParseErrorAtKey { key, .. }
                | PathErrorKind::DeserializeError { key, .. }
                | PathErrorKind::InvalidUtf8InPathParam { key } => Some(key.clone()),
                PathErrorKind::ParseErrorAtIndex { index, .. } => names.get(*index).cloned(),
                PathErrorKind::ParseError { .. } if names.len() == 1 => names.first().cloned(),
                _ => None,
            },
            _ => None,
        };
        match name {
            Some(name) => {
                let detail = format!("the path parameter `{name}` is not valid (ids are UUIDs)");
                Self::new(status, Some(name), detail)
            }
            None if status.is_server_error() => {
                tracing::error!(%status, "management api route cannot read its path parameters");
                Self::new(status, None, "the route cannot read its path parameters".to_owned())
            }
            None => Self::new(status, None, "the path does not parse".to_owned()),
        }
    }

    /// A query string that does not parse.
    fn query(rejection: &QueryRejection) -> Self {
        let status = rejection.status();
        match deserialize_error::<serde_urlencoded::de::Error>(rejection).map(Member::of) {
            Some(Member::Invalid(Some(name))) => {
                let detail = format!("the query parameter `{name}` is not valid");
                Self::new(status, Some(name), detail)
            }
            Some(Member::Missing(name)) => {
                let detail = format!("the query parameter `{name}` is missing");
                Self::new(status, Some(name), detail)
            }
            Some(Member::Unknown { path: Some(name), .. }) => {
                let detail = format!("the query parameter `{name}` is not one this route takes");
                Self::new(status, Some(name), detail)
            }
            Some(Member::Unknown { path: None, .. }) => Self::new(
                status,
                None,
                "the query has a parameter this route does not take".to_owned(),
            ),
            Some(Member::Invalid(None)) | None => {
                Self::new(status, None, "the query string does not parse".to_owned())
            }
        }
    }

    /// A body that is not the expected JSON.
    fn json(rejection: &JsonRejection) -> Self {
        let status = rejection.status();
        let found = deserialize_error::<serde_json::Error>(rejection);
        let detail = match rejection {
            JsonRejection::JsonDataError(_) => match found.map(Member::of) {
                Some(Member::Invalid(Some(name))) => {
                    let detail = format!("the body member `{name}` is not valid");
                    return Self::new(status, Some(name), detail);
                }
                Some(Member::Missing(name)) => {
                    let detail = format!("the body member `{name}` is missing");
                    return Self::new(status, Some(name), detail);
                }
                Some(Member::Unknown { path: Some(path), .. }) => {
                    let detail = format!("the body member `{path}` is not one this request takes");
                    return Self::new(status, Some(path), detail);
                }
                Some(Member::Unknown { parent: Some(parent), path: None }) => {
                    let detail =
                        format!("the body member `{parent}` has a member it does not take");
                    return Self::new(status, Some(parent), detail);
                }
                Some(Member::Unknown { parent: None, path: None }) => {
                    "the body has a member this request does not take".to_owned()
                }
                Some(Member::Invalid(None)) | None => {
                    "the body is not the JSON this request takes".to_owned()
                }
            },
            JsonRejection::JsonSyntaxError(_) => match found {
                Some(e) => format!(
                    "the body is not valid JSON (line {}, column {})",
                    e.inner().line(),
                    e.inner().column()
                ),
                None => "the body is not valid JSON".to_owned(),
            },
            JsonRejection::MissingJsonContentType(_) => {
                "the body must be JSON, sent with Content-Type: application/json".to_owned()
            }
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => "the body is too large".to_owned(),
            _ => "the body could not be read".to_owned(),
        };
        Self::new(status, None, detail)
    }
}

/// The `serde_path_to_error` error behind an axum rejection (its `Json` and `Query`
/// deserialize through it), found in the rejection's source chain.
fn deserialize_error<'a, E: std::error::Error + 'static>(
    rejection: &'a (dyn std::error::Error + 'static),
) -> Option<&'a serde_path_to_error::Error<E>> {
    let mut next = Some(rejection);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<serde_path_to_error::Error<E>>() {
            return Some(found);
        }
        next = error.source();
    }
    None
}

/// Which member of a query or body a deserialization error is about, by name only.
enum Member {
    /// This member's value is not valid (`None`: the whole query or body).
    Invalid(Option<String>),
    /// This member is required and absent.
    Missing(String),
    /// A member the type does not take: its full path (`credits.refil`) when its name is
    /// shaped like the names this API uses ([`member_name_shaped`]), else only the member it
    /// is inside (`None`: at the top). Its name is the client's text, not ours, so a name of
    /// any other shape (a key, a token) is not repeated.
    Unknown { parent: Option<String>, path: Option<String> },
}

/// Whether the client's name for a member it sent may be repeated in a problem: lowercase
/// ASCII letters and underscores, starting with a letter, at most 32 characters, like every
/// member and parameter of this API. A typo (`owner`, `refil`) is named; a key, a token or
/// anything with a digit, an uppercase letter or punctuation in it is not.
fn member_name_shaped(name: &str) -> bool {
    name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        && find_keys(name.as_bytes()).is_empty()
}

impl Member {
    fn of<E: std::error::Error>(error: &serde_path_to_error::Error<E>) -> Self {
        use serde_path_to_error::Segment;
        let message = error.inner().to_string();
        let mut segments: Vec<&Segment> = error.path().iter().collect();
        // serde's messages for these two name a member: an unknown one (the client's text,
        // also the path's last segment) or a missing one (the type's own field name).
        let unknown = message.starts_with("unknown field `");
        let mut unknown_name = None;
        if unknown && let Some(Segment::Map { key }) = segments.last() {
            unknown_name = Some(key.clone()).filter(|k| member_name_shaped(k));
            segments.pop();
        }
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name);
        let mut path = String::new();
        let push_name = |path: &mut String, name: &str| {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(name);
        };
        for segment in segments {
            match segment {
                Segment::Seq { index } => path.push_str(&format!("[{index}]")),
                Segment::Map { key } | Segment::Enum { variant: key } => push_name(&mut path, key),
                Segment::Unknown => push_name(&mut path, "?"),
            }
        }
        if let Some(name) = missing {
            push_name(&mut path, name);
        }
        // The path holds the names of members the type took, never values; a key there
        // would be the client's text all the same, so it is left out.
        let path = Some(path).filter(|p| !p.is_empty() && find_keys(p.as_bytes()).is_empty());
        match (unknown, missing, path) {
            (true, _, parent) => {
                let path = unknown_name.map(|name| match &parent {
                    Some(parent) => format!("{parent}.{name}"),
                    None => name,
                });
                Member::Unknown { parent, path }
            }
            (false, Some(_), Some(path)) => Member::Missing(path),
            (false, _, path) => Member::Invalid(path),
        }
    }
}

/// axum's `Json`, `Path` and `Query`, answering a request that does not parse with a
/// [`BadRequest`] problem.
struct ApiJson<T>(T);
struct ApiPath<T>(T);
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = BadRequest;

    async fn from_request(req: Request, state: &S) -> Result<Self, BadRequest> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(BadRequest::json(&rejection)),
        }
    }
}

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = BadRequest;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, BadRequest> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(path) => Ok(Self(path.0)),
            Err(rejection) => {
                let names = match RawPathParams::from_request_parts(parts, state).await {
                    Ok(raw) => raw.iter().map(|(name, _)| name.to_owned()).collect(),
                    Err(_) => Vec::new(),
                };
                Err(BadRequest::path(&rejection, &names))
            }
        }
    }
}

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = BadRequest;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, BadRequest> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(query) => Ok(Self(query.0)),
            Err(rejection) => Err(BadRequest::query(&rejection)),
        }
    }
}

type Answer<T> = Result<T, ApiError>;

/// A name, to create an organization, a project or a product.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NameBody {
    /// The unique name (within the organization, for projects and products).
    pub name: String,
}

/// A newly created key: the plaintext, shown in this answer only, and the stored record.
///
/// The plaintext is in the JSON (that is what the answer is for) and nowhere else: `Debug`
/// prints `[redacted]` in its place, whatever the string holds, and the record, whose
/// `hint` tells which key it is.
#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    /// The plaintext key. It is not stored and cannot be shown again.
    pub key: String,
    /// What was stored.
    pub record: ApiKey,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &format_args!("[redacted]"))
            .field("record", &self.record)
            .finish()
    }
}

/// Changes to a key; absent members stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyBody {
    /// A new display name.
    #[serde(default)]
    pub name: Option<String>,
    /// A new set of scopes (replacing the old one).
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// A new rate limit; `null` removes the limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<RateLimit>)]
    pub rate_limit: Option<Option<RateLimit>>,
    /// New named rate limits, replacing them all (`{}` or `null` removes them): `{"daily":
    /// {"requests": 10000, "window": "day"}}`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<std::collections::BTreeMap<String, RateLimit>>)]
    pub rate_limits: Option<Option<RateLimits>>,
    /// New custom metadata (a JSON object, replacing the old one).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub custom: Option<Value>,
    /// A new owner; `null` removes it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub owner_id: Option<Option<String>>,
    /// New usage credits (the balance and the refill rule, both replaced); `null` removes
    /// them (unlimited use).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Credits>)]
    pub credits: Option<Option<Credits>>,
    /// A new IP allowlist (addresses and CIDR blocks, replacing the old one); `null` removes
    /// it (any address).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_ips: Option<Option<Vec<String>>>,
}

/// A member that is present, `null` included (`Some(None)`); absent is `None`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl UpdateKeyBody {
    fn into_update(self) -> Result<KeyUpdate, Error> {
        let mut update = KeyUpdate::new();
        if let Some(name) = self.name {
            update = update.with_name(name);
        }
        if let Some(scopes) = self.scopes {
            update = update.with_scopes(scopes);
        }
        if let Some(limit) = self.rate_limit {
            update = update.with_rate_limit(limit);
        }
        if let Some(limits) = self.rate_limits {
            update = update.with_rate_limits(limits.unwrap_or_default());
        }
        if let Some(custom) = self.custom {
            update = update.with_custom(custom);
        }
        if let Some(owner) = self.owner_id {
            update = update.with_owner(owner);
        }
        if let Some(credits) = self.credits {
            update = update.with_credits(credits);
        }
        if let Some(allowed) = self.allowed_ips {
            update = update.with_allowed_ips(allowed.map(IpAllowlist::parse).transpose()?);
        }
        Ok(update)
    }
}

/// Which keys, and which page of them.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only keys with this status (all by default).
    #[serde(default)]
    pub status: StatusFilter,
    /// Keys per page, 1 to 1000 (100 by default).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    #[serde(default)]
    pub after: Option<KeyId>,
}

impl ListQuery {
    fn page(&self) -> Result<Page, Error> {
        page_of(self.limit, self.after.map(uuid::Uuid::from))
    }
}

/// The page of `limit` items (100 by default) after `after`.
fn page_of(limit: Option<u32>, after: Option<uuid::Uuid>) -> Result<Page, Error> {
    let page = match limit {
        Some(limit) => Page::first(limit)?,
        None => Page::default(),
    };
    Ok(match after {
        Some(cursor) => page.after(cursor),
        None => page,
    })
}

/// Which page of a listing other than keys.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 1000 (100 by default).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    #[serde(default)]
    pub after: Option<uuid::Uuid>,
}

impl PageQuery {
    fn page(&self) -> Result<Page, Error> {
        page_of(self.limit, self.after)
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "apikeys management API",
        description = "Issue, list, update, revoke and delete API keys; manage organizations, projects and products."
    ),
    components(schemas(Problem))
)]
struct ApiDoc;

/// Error answers every route can give.
#[derive(utoipa::IntoResponses)]
#[expect(dead_code, reason = "only its OpenAPI description is used")]
enum Failures {
    /// The request does not parse.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(#[to_schema] Problem),
    /// The host's admin check refused the request, or an admin of one organization asked
    /// for what only a global admin may do (create an organization).
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// The record (or one the request refers to) does not exist, or belongs to an
    /// organization the admin is not bound to.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// A value was rejected; `field` names it.
    #[response(status = 422, content_type = "application/problem+json")]
    Invalid(Problem),
    /// The database is unreachable; retry after `Retry-After` seconds.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// Creates an organization.
#[utoipa::path(post, path = "/orgs", tag = "organizations", request_body = NameBody,
    responses((status = 201, body = Organization), (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"), Failures))]
async fn create_org(
    a: Acting,
    ApiJson(body): ApiJson<NameBody>,
) -> Answer<(StatusCode, Json<Organization>)> {
    a.global()?;
    Ok((StatusCode::CREATED, Json(a.client.create_organization(&body.name).await?)))
}

/// The organizations, oldest first, a page at a time (for an admin of one organization,
/// that one).
#[utoipa::path(get, path = "/orgs", tag = "organizations", params(PageQuery),
    responses((status = 200, body = KeyPage<Organization, OrgId>), Failures))]
async fn list_orgs(
    a: Acting,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Answer<Json<KeyPage<Organization, OrgId>>> {
    let page = q.page()?;
    Ok(Json(match a.org {
        Some(own) => {
            let past = page.cursor().is_some_and(|after| after >= own.as_uuid());
            let items = if past { Vec::new() } else { vec![a.org(own).await?] };
            KeyPage { items, next: None }
        }
        None => a.client.list_organizations_page(page).await?,
    }))
}

/// One organization.
#[utoipa::path(get, path = "/orgs/{org_id}", tag = "organizations", params(("org_id" = OrgId, Path)),
    responses((status = 200, body = Organization), Failures))]
async fn get_org(a: Acting, ApiPath(id): ApiPath<OrgId>) -> Answer<Json<Organization>> {
    Ok(Json(a.org(id).await?))
}

/// Creates a project in an organization.
#[utoipa::path(post, path = "/orgs/{org_id}/projects", tag = "projects", params(("org_id" = OrgId, Path)), request_body = NameBody,
    responses((status = 201, body = Project), (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"), Failures))]
async fn create_project(
    a: Acting,
    ApiPath(org): ApiPath<OrgId>,
    ApiJson(body): ApiJson<NameBody>,
) -> Answer<(StatusCode, Json<Project>)> {
    a.within(org, org)?;
    Ok((StatusCode::CREATED, Json(a.client.create_project(org, &body.name).await?)))
}

/// The projects of an organization, oldest first, a page at a time.
#[utoipa::path(get, path = "/orgs/{org_id}/projects", tag = "projects", params(("org_id" = OrgId, Path), PageQuery),
    responses((status = 200, body = KeyPage<Project, ProjectId>), Failures))]
async fn list_projects(
    a: Acting,
    ApiPath(org): ApiPath<OrgId>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Answer<Json<KeyPage<Project, ProjectId>>> {
    let page = q.page()?;
    a.org(org).await?;
    Ok(Json(a.client.list_projects_page(org, page).await?))
}

/// One project.
#[utoipa::path(get, path = "/projects/{project_id}", tag = "projects", params(("project_id" = ProjectId, Path)),
    responses((status = 200, body = Project), Failures))]
async fn get_project(a: Acting, ApiPath(id): ApiPath<ProjectId>) -> Answer<Json<Project>> {
    Ok(Json(a.project(id).await?))
}

/// Creates a product in an organization.
#[utoipa::path(post, path = "/orgs/{org_id}/products", tag = "products", params(("org_id" = OrgId, Path)), request_body = NameBody,
    responses((status = 201, body = Product), (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"), Failures))]
async fn create_product(
    a: Acting,
    ApiPath(org): ApiPath<OrgId>,
    ApiJson(body): ApiJson<NameBody>,
) -> Answer<(StatusCode, Json<Product>)> {
    a.within(org, org)?;
    Ok((StatusCode::CREATED, Json(a.client.create_product(org, &body.name).await?)))
}

/// The products of an organization, oldest first, a page at a time.
#[utoipa::path(get, path = "/orgs/{org_id}/products", tag = "products", params(("org_id" = OrgId, Path), PageQuery),
    responses((status = 200, body = KeyPage<Product, ProductId>), Failures))]
async fn list_products(
    a: Acting,
    ApiPath(org): ApiPath<OrgId>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Answer<Json<KeyPage<Product, ProductId>>> {
    let page = q.page()?;
    a.org(org).await?;
    Ok(Json(a.client.list_products_page(org, page).await?))
}

/// One product.
#[utoipa::path(get, path = "/products/{product_id}", tag = "products", params(("product_id" = ProductId, Path)),
    responses((status = 200, body = Product), Failures))]
async fn get_product(a: Acting, ApiPath(id): ApiPath<ProductId>) -> Answer<Json<Product>> {
    Ok(Json(a.product(id).await?))
}

/// Links a product to a project (idempotent): the project's keys become valid for it.
#[utoipa::path(put, path = "/projects/{project_id}/products/{product_id}", tag = "projects",
    params(("project_id" = ProjectId, Path), ("product_id" = ProductId, Path)),
    responses((status = 204, description = "Linked"), Failures))]
async fn link_product(
    a: Acting,
    ApiPath((project, product)): ApiPath<(ProjectId, ProductId)>,
) -> Answer<StatusCode> {
    a.project(project).await?;
    a.product(product).await?;
    a.client.add_product_to_project(product, project).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Unlinks a product from a project (idempotent).
#[utoipa::path(delete, path = "/projects/{project_id}/products/{product_id}", tag = "projects",
    params(("project_id" = ProjectId, Path), ("product_id" = ProductId, Path)),
    responses((status = 204, description = "Unlinked"), Failures))]
async fn unlink_product(
    a: Acting,
    ApiPath((project, product)): ApiPath<(ProjectId, ProductId)>,
) -> Answer<StatusCode> {
    a.project(project).await?;
    a.product(product).await?;
    a.client.remove_product_from_project(product, project).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The products linked to a project.
#[utoipa::path(get, path = "/projects/{project_id}/products", tag = "projects", params(("project_id" = ProjectId, Path)),
    responses((status = 200, body = Vec<Product>), Failures))]
async fn list_project_products(
    a: Acting,
    ApiPath(project): ApiPath<ProjectId>,
) -> Answer<Json<Vec<Product>>> {
    a.project(project).await?;
    Ok(Json(a.client.list_project_products(project).await?))
}

/// Creates a key with any option of `NewKey`: project, product, scopes, rate limit, custom
/// metadata, owner, credits (with their refill) and expiry (`expires_at`,
/// `expires_in_seconds` or `never_expires`; none: the client's default lifetime). Members it
/// does not know are refused. The answer holds the plaintext key, which is not stored and
/// cannot be shown again; it is marked `Cache-Control: no-store`.
#[utoipa::path(post, path = "/orgs/{org_id}/keys", tag = "keys", params(("org_id" = OrgId, Path)), request_body = NewKeyInput,
    responses((status = 201, body = CreatedKey), Failures))]
async fn create_key(
    a: Acting,
    ApiPath(org): ApiPath<OrgId>,
    ApiJson(body): ApiJson<NewKeyInput>,
) -> Answer<Response> {
    a.within(org, org)?;
    // The project and product the body names are checked like the path's records: one of
    // another organization is not found, for an admin bound to this one.
    if a.org.is_some() {
        if let Some(project) = body.project_id {
            a.project(project).await?;
        }
        if let Some(product) = body.product_id {
            a.product(product).await?;
        }
    }
    Ok(created(a.client.create_key(org, body.into_new_key()?).await?))
}

/// The 201 answer with a new key's plaintext, which must be cached nowhere.
fn created(issued: IssuedKey) -> Response {
    let created = CreatedKey { key: issued.key.expose_secret().to_owned(), record: issued.record };
    let mut response = (StatusCode::CREATED, Json(created)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The keys of an organization, oldest first, a page at a time.
#[utoipa::path(get, path = "/orgs/{org_id}/keys", tag = "keys", params(("org_id" = OrgId, Path), ListQuery),
    responses((status = 200, body = KeyPage<ApiKey>), Failures))]
async fn list_org_keys(
    a: Acting,
    ApiPath(org): ApiPath<OrgId>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Answer<Json<KeyPage<ApiKey>>> {
    let page = q.page()?;
    a.org(org).await?;
    Ok(Json(a.client.list_org_keys(org, q.status, page).await?))
}

/// The keys of a project, oldest first, a page at a time.
#[utoipa::path(get, path = "/projects/{project_id}/keys", tag = "keys", params(("project_id" = ProjectId, Path), ListQuery),
    responses((status = 200, body = KeyPage<ApiKey>), Failures))]
async fn list_project_keys(
    a: Acting,
    ApiPath(project): ApiPath<ProjectId>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Answer<Json<KeyPage<ApiKey>>> {
    let page = q.page()?;
    a.project(project).await?;
    Ok(Json(a.client.list_project_keys(project, q.status, page).await?))
}

/// One key (never its plaintext).
#[utoipa::path(get, path = "/keys/{key_id}", tag = "keys", params(("key_id" = KeyId, Path)),
    responses((status = 200, body = ApiKey), Failures))]
async fn get_key(a: Acting, ApiPath(id): ApiPath<KeyId>) -> Answer<Json<ApiKey>> {
    Ok(Json(a.key(id).await?))
}

/// Updates a key's name, scopes, rate limit, custom metadata, owner, credits or IP allowlist.
#[utoipa::path(patch, path = "/keys/{key_id}", tag = "keys", params(("key_id" = KeyId, Path)), request_body = UpdateKeyBody,
    responses((status = 200, body = ApiKey), Failures))]
async fn update_key(
    a: Acting,
    ApiPath(id): ApiPath<KeyId>,
    ApiJson(body): ApiJson<UpdateKeyBody>,
) -> Answer<Json<ApiKey>> {
    let update = body.into_update()?;
    a.key(id).await?;
    Ok(Json(a.client.update_key(id, update).await?))
}

/// Revokes a key (the record is kept; revoking twice keeps the first time).
#[utoipa::path(post, path = "/keys/{key_id}/revoke", tag = "keys", params(("key_id" = KeyId, Path)),
    responses((status = 200, body = ApiKey), Failures))]
async fn revoke_key(a: Acting, ApiPath(id): ApiPath<KeyId>) -> Answer<Json<ApiKey>> {
    a.key(id).await?;
    Ok(Json(a.client.revoke_key(id).await?))
}

/// Deletes a key for good (for erasure); revoke it instead to keep the record.
#[utoipa::path(delete, path = "/keys/{key_id}", tag = "keys", params(("key_id" = KeyId, Path)),
    responses((status = 204, description = "Deleted"), Failures))]
async fn delete_key(a: Acting, ApiPath(id): ApiPath<KeyId>) -> Answer<StatusCode> {
    a.key(id).await?;
    a.client.delete_key(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Disables a key: it is refused (401, code `disabled`) until enabled again. Unlike a
/// revocation this can be undone; disabling twice keeps the first time. A revoked key
/// cannot be disabled (409, code `revoked`).
#[utoipa::path(post, path = "/keys/{key_id}/disable", tag = "keys", params(("key_id" = KeyId, Path)),
    responses((status = 200, body = ApiKey), (status = 409, description = "The key is revoked (code `revoked`)", body = Problem, content_type = "application/problem+json"), Failures))]
async fn disable_key(a: Acting, ApiPath(id): ApiPath<KeyId>) -> Answer<Json<ApiKey>> {
    a.key(id).await?;
    Ok(Json(a.client.disable_key(id).await?))
}

/// Enables a disabled key again (enabling an enabled key changes nothing). A revoked key
/// stays revoked (409, code `revoked`).
#[utoipa::path(post, path = "/keys/{key_id}/enable", tag = "keys", params(("key_id" = KeyId, Path)),
    responses((status = 200, body = ApiKey), (status = 409, description = "The key is revoked (code `revoked`)", body = Problem, content_type = "application/problem+json"), Failures))]
async fn enable_key(a: Acting, ApiPath(id): ApiPath<KeyId>) -> Answer<Json<ApiKey>> {
    a.key(id).await?;
    Ok(Json(a.client.enable_key(id).await?))
}

/// How to roll a key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollBody {
    /// How long the old key keeps working, in seconds (0: revoked at once; at most a year).
    pub grace_seconds: u64,
}

/// Replaces a key by a new one with the same settings; the old one keeps working for the
/// grace period, spending the new key's credits and rate limit. The answer holds the new
/// plaintext, which cannot be shown again (`Cache-Control: no-store`). A key already rolled
/// is refused (409, naming the key it was rolled to); a revoked or expired one too.
#[utoipa::path(post, path = "/keys/{key_id}/roll", tag = "keys", params(("key_id" = KeyId, Path)), request_body = RollBody,
    responses((status = 201, body = CreatedKey), (status = 409, description = "Already rolled (to `id`), or revoked (code `revoked`)", body = Problem, content_type = "application/problem+json"), Failures))]
async fn roll_key(
    a: Acting,
    ApiPath(id): ApiPath<KeyId>,
    ApiJson(body): ApiJson<RollBody>,
) -> Answer<Response> {
    a.key(id).await?;
    let grace = std::time::Duration::from_secs(body.grace_seconds);
    Ok(created(a.client.roll_key(id, grace).await?))
}

/// A key's new expiry: exactly one of the two members.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// The new expiry (in the future, at most the end of year 9999).
    #[serde(default)]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Moves the current expiry this many seconds later (for a key that expires).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub extend_by_seconds: Option<u64>,
}

/// Moves a key's expiry: to `expires_at`, or `extend_by_seconds` later. A revoked key, or
/// one that was rolled (renew its successor), is refused.
#[utoipa::path(post, path = "/keys/{key_id}/renew", tag = "keys", params(("key_id" = KeyId, Path)), request_body = RenewBody,
    responses((status = 200, body = ApiKey), (status = 409, description = "Rolled (renew the key it was rolled to), or revoked (code `revoked`)", body = Problem, content_type = "application/problem+json"), Failures))]
async fn renew_key(
    a: Acting,
    ApiPath(id): ApiPath<KeyId>,
    ApiJson(body): ApiJson<RenewBody>,
) -> Answer<Json<ApiKey>> {
    a.key(id).await?;
    let c = &a.client;
    let key = match (body.expires_at, body.extend_by_seconds) {
        (Some(at), None) => c.renew_key(id, at).await?,
        (None, Some(seconds)) => c.extend_key(id, std::time::Duration::from_secs(seconds)).await?,
        _ => {
            return Err(ApiError::Store(Error::invalid_input(
                "expires_at",
                "give exactly one of expires_at and extend_by_seconds",
            )));
        }
    };
    Ok(Json(key))
}

/// A key's audit trail, oldest first, a page at a time: created, updated, rolled, renewed,
/// disabled, enabled, revoked, deleted, with the acting admin when one was named.
#[utoipa::path(get, path = "/keys/{key_id}/events", tag = "keys", params(("key_id" = KeyId, Path), PageQuery),
    responses((status = 200, body = KeyPage<KeyEvent, uuid::Uuid>), Failures))]
async fn list_key_events(
    a: Acting,
    ApiPath(id): ApiPath<KeyId>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Answer<Json<KeyPage<KeyEvent, uuid::Uuid>>> {
    let page = q.page()?;
    a.key(id).await?;
    Ok(Json(a.client.list_key_events_page(id, page).await?))
}

/// The keys of one owner in an organization (owner ids are per organization), oldest
/// first, a page at a time.
#[utoipa::path(get, path = "/orgs/{org_id}/owners/{owner_id}/keys", tag = "owners",
    params(("org_id" = OrgId, Path), ("owner_id" = String, Path), ListQuery),
    responses((status = 200, body = KeyPage<ApiKey>), Failures))]
async fn list_owner_keys(
    a: Acting,
    ApiPath((org, owner)): ApiPath<(OrgId, String)>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Answer<Json<KeyPage<ApiKey>>> {
    let page = q.page()?;
    a.org(org).await?;
    Ok(Json(a.client.list_owner_keys(org, &owner, q.status, page).await?))
}

/// The ids of the keys an owner-wide revocation revoked.
#[derive(Debug, Serialize, ToSchema)]
pub struct RevokedKeys {
    /// The keys revoked by this call (keys revoked before are not listed).
    pub revoked: Vec<KeyId>,
}

/// Revokes every key of one owner in an organization, in one transaction (a departed user,
/// a closed account).
#[utoipa::path(post, path = "/orgs/{org_id}/owners/{owner_id}/revoke", tag = "owners",
    params(("org_id" = OrgId, Path), ("owner_id" = String, Path)),
    responses((status = 200, body = RevokedKeys), Failures))]
async fn revoke_owner_keys(
    a: Acting,
    ApiPath((org, owner)): ApiPath<(OrgId, String)>,
) -> Answer<Json<RevokedKeys>> {
    a.org(org).await?;
    Ok(Json(RevokedKeys { revoked: a.client.revoke_owner_keys(org, &owner).await? }))
}

/// The owners of an organization that have a plan, a page at a time.
#[utoipa::path(get, path = "/orgs/{org_id}/owners", tag = "owners", params(("org_id" = OrgId, Path), PageQuery),
    responses((status = 200, body = KeyPage<Owner, uuid::Uuid>), Failures))]
async fn list_owners(
    a: Acting,
    ApiPath(org): ApiPath<OrgId>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Answer<Json<KeyPage<Owner, uuid::Uuid>>> {
    let page = q.page()?;
    a.org(org).await?;
    Ok(Json(a.client.list_owners_page(org, page).await?))
}

/// An owner's plan: the limits and credits every key of the owner shares.
#[utoipa::path(get, path = "/orgs/{org_id}/owners/{owner_id}", tag = "owners",
    params(("org_id" = OrgId, Path), ("owner_id" = String, Path)),
    responses((status = 200, body = Owner), Failures))]
async fn get_owner(
    a: Acting,
    ApiPath((org, owner)): ApiPath<(OrgId, String)>,
) -> Answer<Json<Owner>> {
    a.org(org).await?;
    Ok(Json(a.client.get_owner(org, &owner).await?))
}

/// Sets an owner's plan whole (created, or replaced: a balance given is set anew, none
/// removes it). Every key of the owner, and every key rolled from one, shares it.
#[utoipa::path(put, path = "/orgs/{org_id}/owners/{owner_id}", tag = "owners",
    params(("org_id" = OrgId, Path), ("owner_id" = String, Path)), request_body = OwnerPlan,
    responses((status = 200, body = Owner), Failures))]
async fn set_owner(
    a: Acting,
    ApiPath((org, owner)): ApiPath<(OrgId, String)>,
    ApiJson(plan): ApiJson<OwnerPlan>,
) -> Answer<Json<Owner>> {
    a.org(org).await?;
    Ok(Json(a.client.set_owner(org, &owner, plan).await?))
}

/// The limits of an owner's plan, to change them alone.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OwnerLimitsBody {
    /// The shared limits, by name (`{}` removes them).
    #[schema(value_type = std::collections::BTreeMap<String, RateLimit>)]
    pub rate_limits: RateLimits,
}

/// Changes only the limits of an owner's plan (creating a plan without credits if there is
/// none); the balance stays as it is.
#[utoipa::path(patch, path = "/orgs/{org_id}/owners/{owner_id}", tag = "owners",
    params(("org_id" = OrgId, Path), ("owner_id" = String, Path)), request_body = OwnerLimitsBody,
    responses((status = 200, body = Owner), Failures))]
async fn set_owner_limits(
    a: Acting,
    ApiPath((org, owner)): ApiPath<(OrgId, String)>,
    ApiJson(body): ApiJson<OwnerLimitsBody>,
) -> Answer<Json<Owner>> {
    a.org(org).await?;
    Ok(Json(a.client.set_owner_limits(org, &owner, body.rate_limits).await?))
}

/// Deletes an owner's plan: its keys stop sharing limits and credits (the keys stay; see
/// `POST /orgs/{org_id}/owners/{owner_id}/revoke`).
#[utoipa::path(delete, path = "/orgs/{org_id}/owners/{owner_id}", tag = "owners",
    params(("org_id" = OrgId, Path), ("owner_id" = String, Path)),
    responses((status = 204, description = "Deleted"), Failures))]
async fn delete_owner(
    a: Acting,
    ApiPath((org, owner)): ApiPath<(OrgId, String)>,
) -> Answer<StatusCode> {
    a.org(org).await?;
    a.client.delete_owner(org, &owner).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds credits to the balance an owner's keys share, in one atomic statement. A plan with
/// no balance is refused (422, field `credits`).
#[utoipa::path(post, path = "/orgs/{org_id}/owners/{owner_id}/credits", tag = "owners",
    params(("org_id" = OrgId, Path), ("owner_id" = String, Path)), request_body = AddCreditsBody,
    responses((status = 200, body = Owner), Failures))]
async fn add_owner_credits(
    a: Acting,
    ApiPath((org, owner)): ApiPath<(OrgId, String)>,
    ApiJson(body): ApiJson<AddCreditsBody>,
) -> Answer<Json<Owner>> {
    a.org(org).await?;
    Ok(Json(a.client.add_owner_credits(org, &owner, body.add).await?))
}

/// Credits to add to a key's balance.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddCreditsBody {
    /// How many credits to add (at least 1).
    #[schema(minimum = 1)]
    pub add: u64,
}

/// Adds credits to a key's balance (a top-up) in one atomic statement, after the refill
/// that fell due if any; checks spending meanwhile on any replica lose none of them. To set
/// the balance, `PATCH` the key's `credits`. A key with no balance is refused (422, field
/// `credits`), as is a revoked key (409) or a rolled one (409, naming the key it was rolled
/// to, which holds its balance).
#[utoipa::path(post, path = "/keys/{key_id}/credits", tag = "keys", params(("key_id" = KeyId, Path)), request_body = AddCreditsBody,
    responses((status = 200, body = ApiKey), (status = 409, description = "Revoked (code `revoked`), or rolled (to `id`)", body = Problem, content_type = "application/problem+json"), Failures))]
async fn add_credits(
    a: Acting,
    ApiPath(id): ApiPath<KeyId>,
    ApiJson(body): ApiJson<AddCreditsBody>,
) -> Answer<Json<ApiKey>> {
    a.key(id).await?;
    Ok(Json(a.client.add_credits(id, body.add).await?))
}
