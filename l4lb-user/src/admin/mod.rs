//! Operator-facing HTTP: the `upstream_show` listener (nginx-upsync's text format) and
//! the JSON admin API on `[admin] listen`.

pub(crate) mod api;
mod guard;
mod json;
pub mod show;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AdminConfig;
use crate::discovery::Board;
use crate::proxy::SharedCtx;
use crate::upstream::Upstreams;

#[derive(Deserialize)]
struct ShowQuery {
    upstream: Option<String>,
}

/// Serves `GET /upstream_show[?upstream=NAME]` until `stop`, to the clients the
/// `[[server]]` block's `access` and `limit_conn` admit (`ctx`).
pub async fn serve_upstream_show(
    listener: TcpListener,
    ctx: SharedCtx,
    upstreams: Arc<Upstreams>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/upstream_show", get(upstream_show))
        .with_state(upstreams);
    if let Err(e) = axum::serve(guard::Guarded::new(listener, Some(ctx)), app)
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
    show_text(&upstreams, q)
}

fn show_text(upstreams: &Upstreams, q: ShowQuery) -> (StatusCode, String) {
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

/// The running admin API listener.
pub struct AdminServer {
    pub listen: SocketAddr,
    /// A duplicate of the listening socket, for a binary upgrade to pass on.
    pub socket: OwnedFd,
    state: Arc<api::AdminState>,
    stop: CancellationToken,
}

impl AdminServer {
    pub async fn start(
        cfg: &AdminConfig,
        upstreams: Arc<Upstreams>,
        board: Arc<Board>,
        registry: Arc<Registry>,
        inherited: Option<OwnedFd>,
    ) -> anyhow::Result<Self> {
        // A binary upgrade's new process takes changes once it serves (the old one
        // refuses them meanwhile): before that, one it answered would go if it failed.
        let frozen = inherited.is_some();
        let listener = match inherited {
            Some(fd) => crate::upgrade::tcp_listener(fd)?,
            None => TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {} for the admin API", cfg.listen))?,
        };
        let socket = listener.as_fd().try_clone_to_owned()?;
        let state = Arc::new(api::AdminState::new(
            upstreams,
            board,
            registry,
            cfg.token.clone(),
        ));
        state
            .frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
        let stop = CancellationToken::new();
        let app = api::router(Arc::clone(&state));
        let until = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(guard::Guarded::new(listener, None), app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await
            {
                error!(error = %e, "admin API listener failed");
            }
        });
        info!(listen = %cfg.listen, changes_enabled = cfg.token.is_some(), "admin API listening");
        Ok(AdminServer {
            listen: cfg.listen,
            socket,
            state,
            stop,
        })
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Refuses changes (503) while a binary upgrade carries the server sets over, or
    /// takes them again after one that failed.
    pub fn freeze(&self, frozen: bool) {
        self.state
            .frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    /// Applies a reloaded `[admin]`: a new token at once; a new address by opening it
    /// before closing the old one (on failure the old listener stays).
    pub async fn reload(self, cfg: Option<&AdminConfig>) -> Option<Self> {
        let Some(cfg) = cfg else {
            self.stop();
            info!(listen = %self.listen, "admin API closed");
            return None;
        };
        if cfg.listen == self.listen {
            self.state.token.store(cfg.token.clone().map(Arc::new));
            return Some(self);
        }
        let upstreams = Arc::clone(&self.state.upstreams);
        let board = Arc::clone(&self.state.board);
        let registry = Arc::clone(&self.state.registry);
        match AdminServer::start(cfg, upstreams, board, registry, None).await {
            Ok(next) => {
                self.stop();
                Some(next)
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), old = %self.listen, "admin API stays on its old address");
                self.state.token.store(cfg.token.clone().map(Arc::new));
                Some(self)
            }
        }
    }
}
