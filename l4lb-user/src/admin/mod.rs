//! Operator-facing HTTP: the `upstream_show` listener (nginx-upsync's text format).

mod show;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::upstream::Upstreams;

#[derive(Deserialize)]
struct ShowQuery {
    upstream: Option<String>,
}

/// Serves `GET /upstream_show[?upstream=NAME]` until `stop`.
pub async fn serve_upstream_show(
    listener: TcpListener,
    upstreams: Arc<Upstreams>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/upstream_show", get(upstream_show))
        .with_state(upstreams);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "upstream_show listener failed");
    }
}

async fn upstream_show(
    State(upstreams): State<Arc<Upstreams>>,
    Query(q): Query<ShowQuery>,
) -> (StatusCode, String) {
    let all = upstreams.all();
    match q.upstream {
        Some(name) => match all.get(&name) {
            Some(up) => (StatusCode::OK, show::render(up)),
            None => (
                StatusCode::NOT_FOUND,
                format!("upstream {name} not found\n"),
            ),
        },
        None => (
            StatusCode::OK,
            all.values().map(|up| show::render(up)).collect(),
        ),
    }
}
