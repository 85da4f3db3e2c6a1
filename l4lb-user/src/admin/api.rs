//! The JSON admin API on `[admin] listen`.
//!
//! Reads are open (the listener is loopback by default). Changes need
//! `Authorization: Bearer <token>` with the `[admin]` token; without a configured
//! token they are refused. An upstream fed by an upsync source is refused with 409:
//! its source of truth is Consul/etcd, and a change made here would be overwritten.
//! Admin changes to a static upstream last until a reload changes that upstream's
//! `servers` (or a restart).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
// Constant-time comparison: the time taken does not leak how much of a token matched.
use subtle::ConstantTimeEq;
use tracing::info;

use super::{json as view, ShowQuery};
use crate::config::ServerSpec;
use crate::discovery::params::{FieldError, ServerParams, Strictness};
use crate::discovery::Board;
use crate::upstream::{Source, Upstream, Upstreams};
use prometheus_client::registry::Registry;

pub struct AdminState {
    pub upstreams: Arc<Upstreams>,
    pub board: Arc<Board>,
    pub registry: Arc<Registry>,
    /// Swapped on reload; never logged.
    pub token: ArcSwapOption<String>,
    /// Set while a binary upgrade carries the server sets over: a change made after
    /// they were sent would be answered here and lost.
    pub frozen: std::sync::atomic::AtomicBool,
}

impl AdminState {
    pub fn new(
        upstreams: Arc<Upstreams>,
        board: Arc<Board>,
        registry: Arc<Registry>,
        token: Option<String>,
    ) -> Self {
        AdminState {
            upstreams,
            board,
            registry,
            token: ArcSwapOption::from(token.map(Arc::new)),
            frozen: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

type Shared = Arc<AdminState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/api/upstreams", get(list))
        .route("/api/upstreams/{name}", get(one))
        .route(
            "/api/upstreams/{name}/servers/{addr}",
            get(one_server)
                .put(put_server)
                .patch(patch_server)
                .delete(delete_server),
        )
        .route("/metrics", get(metrics))
        .route("/upstream_show", get(upstream_show))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        // A server's parameters are a few fields.
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

const BODY_LIMIT: usize = 64 * 1024;

/// The path and body an endpoint was given, or why not, in the API's JSON.
type PathParts<T> = Result<Path<T>, PathRejection>;
type Body = Result<Bytes, BytesRejection>;

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(r.status(), r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        ApiError::new(r.status(), r.body_text())
    }
}

struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }

    fn field(e: FieldError) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
            field: Some(e.field),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

async fn list(State(st): State<Shared>) -> Json<Value> {
    let all = st.upstreams.all();
    let map: serde_json::Map<String, Value> = all
        .iter()
        .map(|(name, up)| (name.clone(), view::upstream(up, &st.board)))
        .collect();
    Json(json!({ "upstreams": map }))
}

fn find(st: &AdminState, name: &str) -> Result<Arc<Upstream>, ApiError> {
    st.upstreams
        .get(name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("upstream {name} not found")))
}

async fn one(State(st): State<Shared>, path: PathParts<String>) -> Result<Json<Value>, ApiError> {
    let Path(name) = path?;
    let up = find(&st, &name)?;
    Ok(Json(view::upstream(&up, &st.board)))
}

async fn one_server(
    State(st): State<Shared>,
    path: PathParts<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let Path((name, addr)) = path?;
    let up = find(&st, &name)?;
    let addr = parse_addr(&addr)?;
    let snap = up.snapshot();
    let peer = snap
        .peers
        .iter()
        .find(|p| p.spec.addr == addr)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("server {addr} not in upstream {name}"),
            )
        })?;
    Ok(Json(view::server(
        peer,
        &snap.source.to_string(),
        std::time::Instant::now(),
        up.config().health_check.is_some(),
    )))
}

/// Prometheus text exposition (OpenMetrics flavour, which Prometheus reads natively).
async fn metrics(State(st): State<Shared>) -> Response {
    match crate::metrics::render(&st.registry) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics")
            .into_response(),
    }
}

async fn upstream_show(
    State(st): State<Shared>,
    Query(q): Query<ShowQuery>,
) -> (StatusCode, String) {
    super::show_text(&st.upstreams, q)
}

fn authorize(st: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = st.token.load_full() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "changes are disabled: set [admin] token_env or token_file",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if bool::from(g.as_bytes().ct_eq(token.as_bytes())) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong Authorization: Bearer token",
        )),
    }
}

fn parse_addr(addr: &str) -> Result<SocketAddr, ApiError> {
    addr.parse().map_err(|_| {
        ApiError::field(FieldError {
            field: "address".into(),
            message: format!("{addr:?} is not an ip:port address"),
        })
    })
}

/// A PUT or PATCH body: server parameters as JSON, or nothing.
pub(crate) fn parse_body(body: &[u8]) -> Result<ServerParams, FieldError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ServerParams::default());
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| FieldError {
        field: "(body)".into(),
        message: format!("not JSON: {e}"),
    })?;
    ServerParams::from_json(&value, Strictness::Admin)
}

/// Checks a change's token, upstream and address.
fn begin(
    st: &AdminState,
    headers: &HeaderMap,
    name: &str,
    addr: &str,
) -> Result<(Arc<Upstream>, SocketAddr), ApiError> {
    authorize(st, headers)?;
    let up = find(st, name)?;
    let addr = parse_addr(addr)?;
    Ok((up, addr))
}

/// Applies `change` to the upstream's current set under its write lock (a reload or a
/// discovery answer cannot come between the read and the write), unless an upsync
/// source manages the set.
fn commit(
    st: &AdminState,
    up: &Upstream,
    what: &str,
    change: impl FnOnce(&mut Vec<ServerSpec>) -> Result<StatusCode, ApiError>,
) -> Result<Response, ApiError> {
    let (status, _) = up.update(Source::Admin, |config, mut servers| {
        // Looked at under the write lock, which the upgrade takes to send the sets.
        if st.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "a binary upgrade is running; retry in a moment",
            ));
        }
        if let Some(u) = &config.upsync {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "upstream {} is managed by its upsync source ({}); change the servers there",
                    up.name,
                    crate::discovery::shown_url(&u.url)
                ),
            ));
        }
        let status = change(&mut servers)?;
        Ok((servers, status))
    })?;
    info!(upstream = %up.name, change = what, "server set changed through the admin API");
    Ok((status, Json(view::upstream(up, &st.board))).into_response())
}

/// Adds a server or replaces all its parameters (absent ones take nginx's defaults).
async fn put_server(
    State(st): State<Shared>,
    headers: HeaderMap,
    path: PathParts<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((name, addr)) = path?;
    let body = body?;
    let (up, addr) = begin(&st, &headers, &name, &addr)?;
    let params = parse_body(&body).map_err(ApiError::field)?;
    let mut spec = ServerSpec::new(addr);
    params.apply_to(&mut spec);
    commit(&st, &up, &format!("put {addr}"), |servers| {
        Ok(match servers.iter_mut().find(|s| s.addr == addr) {
            Some(existing) => {
                *existing = spec;
                StatusCode::OK
            }
            None => {
                servers.push(spec);
                StatusCode::CREATED
            }
        })
    })
}

/// Changes the given parameters of an existing server (e.g. `{"down": true}` drains it).
async fn patch_server(
    State(st): State<Shared>,
    headers: HeaderMap,
    path: PathParts<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((name, addr)) = path?;
    let body = body?;
    let (up, addr) = begin(&st, &headers, &name, &addr)?;
    let params = parse_body(&body).map_err(ApiError::field)?;
    commit(&st, &up, &format!("patch {addr}"), |servers| {
        let existing = servers
            .iter_mut()
            .find(|s| s.addr == addr)
            .ok_or_else(|| not_in(addr, &name))?;
        params.apply_to(existing);
        Ok(StatusCode::OK)
    })
}

/// Removes a server; its established sessions continue.
async fn delete_server(
    State(st): State<Shared>,
    headers: HeaderMap,
    path: PathParts<(String, String)>,
) -> Result<Response, ApiError> {
    let Path((name, addr)) = path?;
    let (up, addr) = begin(&st, &headers, &name, &addr)?;
    commit(&st, &up, &format!("delete {addr}"), |servers| {
        let before = servers.len();
        servers.retain(|s| s.addr != addr);
        if servers.len() == before {
            return Err(not_in(addr, &name));
        }
        Ok(StatusCode::OK)
    })
}

fn not_in(addr: SocketAddr, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("server {addr} not in upstream {name}"),
    )
}
