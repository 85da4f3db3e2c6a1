//! Metrics, each declared once here and served by one Prometheus registry (`GET
//! /metrics` on the admin listener, text exposition format).
//!
//! Counters written per session sit in [`METRICS`]; the data path keeps handles per
//! listener ([`ListenerMetrics`]) so a session only touches atomics, never a label map.
//! State that already lives elsewhere (per-server counts and health in each server's
//! live state, the kernel path's counters and map sizes) is read at scrape time by
//! [`LiveState`], so series of a removed server disappear with it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::discovery::Board;
use crate::splice::Splicer;
use crate::upstream::Upstreams;
use crate::xdp::XdpFilter;

/// Why a TCP session was not (or no longer) spliced in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyReason {
    /// `splice = "off"` for this server block.
    SpliceOff,
    /// `proxy_upload_rate` / `proxy_download_rate` need userspace pacing.
    RateLimited,
    /// The eBPF programs could not be loaded at start.
    KernelUnavailable,
    /// The kernel refused the socket (e.g. no longer ESTABLISHED).
    InsertFailed,
    /// A spliced session stalled and was moved to userspace.
    Watchdog,
    /// A peer fell so far behind that the kernel would queue more than the lag cap for
    /// it (pausing did not hold, or the source could no longer pause); the userspace copy
    /// has TCP's own backpressure.
    Lagging,
    /// A paused source could not rejoin the kernel path (its write side was shut down
    /// meanwhile, or reading what it held made no progress).
    ClosedWhilePaused,
    /// The session ended before it earned the kernel path (`splice_after_bytes` /
    /// `splice_after_time`).
    Short,
    /// It earned the kernel path, but a side had half-closed (a socket that is no
    /// longer established cannot enter the sockmap), or it ended while moving.
    HalfClosed,
    /// The session moved bytes as one bulk stream whenever it was due for the kernel
    /// path, where one stream is slower on these hosts (README, Kernel path).
    Bulk,
    /// The session was busy with small requests and answers whenever it was due for
    /// the kernel path, which relays those slower (README, Kernel path).
    Chatty,
}

impl CopyReason {
    pub const ALL: [CopyReason; 11] = [
        CopyReason::SpliceOff,
        CopyReason::RateLimited,
        CopyReason::KernelUnavailable,
        CopyReason::InsertFailed,
        CopyReason::Watchdog,
        CopyReason::Lagging,
        CopyReason::ClosedWhilePaused,
        CopyReason::Short,
        CopyReason::HalfClosed,
        CopyReason::Bulk,
        CopyReason::Chatty,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CopyReason::SpliceOff => "splice_off",
            CopyReason::RateLimited => "rate_limited",
            CopyReason::KernelUnavailable => "kernel_unavailable",
            CopyReason::InsertFailed => "insert_failed",
            CopyReason::Watchdog => "watchdog",
            CopyReason::Lagging => "lagging",
            CopyReason::ClosedWhilePaused => "closed_while_paused",
            CopyReason::Short => "short",
            CopyReason::HalfClosed => "half_closed",
            CopyReason::Bulk => "bulk",
            CopyReason::Chatty => "chatty",
        }
    }
}

/// An upstream's name as a label value: the text format leaves escaping to the caller,
/// and a name is any TOML key, so one `"` would make the whole scrape unreadable.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(String);

impl From<&str> for Name {
    fn from(name: &str) -> Self {
        Name(name.to_string())
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
    /// `tcp` or `udp`: a TCP and a UDP listener may share an address.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: String,
    pub protocol: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub listener: String,
    pub protocol: &'static str,
    /// `kernel` or `copy`.
    pub path: &'static str,
    /// Why a session was copied (`none` for the kernel path).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub upstream: Name,
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub upstream: Name,
    pub server: String,
    /// `pass` or `fail`.
    pub result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Backend connect time: 100 µs to about 6.5 s.
fn connect_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 9))
}

/// Session duration: 1 ms to about 4.5 h.
fn session_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

pub struct Metrics {
    pub accepted: Family<ListenerLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub active: Family<ListenerLabels, Gauge>,
    pub sessions: Family<PathLabels, Counter>,
    pub session_seconds: Histograms<ListenerLabels>,
    pub udp_sessions: Family<ListenerLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub session_panics: Counter,
    /// Sessions moved from the copy path into the kernel, and how long they had lived.
    pub promotions: Histogram,
    /// Checks that kept a due session on the copy path because it was a bulk stream.
    pub promotions_deferred: Counter,
    pub connect_seconds: Histograms<UpstreamLabels>,
    pub health_checks: Family<CheckLabels, Counter>,
    pub health_check_seconds: Histograms<ServerLabels>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    accepted: Family::default(),
    refused: Family::default(),
    active: Family::default(),
    sessions: Family::default(),
    session_seconds: Family::new_with_constructor(session_buckets),
    udp_sessions: Family::default(),
    bytes: Family::default(),
    session_panics: Counter::default(),
    promotions: session_buckets(),
    promotions_deferred: Counter::default(),
    connect_seconds: Family::new_with_constructor(connect_buckets),
    health_checks: Family::default(),
    health_check_seconds: Family::new_with_constructor(connect_buckets),
});

/// The registry `/metrics` encodes: every family of [`METRICS`] plus the live state.
pub fn registry(
    upstreams: Arc<Upstreams>,
    board: Arc<Board>,
    splicer: Option<Arc<Splicer>>,
    xdp: Option<Arc<Mutex<XdpFilter>>>,
) -> Registry {
    let m = &*METRICS;
    // Both paths show from the start, so a rate over them never starts from nothing.
    for path in ["kernel", "copy"] {
        let _ = m.bytes.get_or_create(&BytesLabels { path });
    }
    let mut r = Registry::with_prefix("l4lb");
    r.register("accepted", "TCP connections accepted", m.accepted.clone());
    r.register(
        "refused",
        "Client connections closed without a backend (no_server, connect_failed, panic, denied, limit_conn, proxy_protocol, max_connections: UDP datagrams of new sessions dropped at the limit)",
        m.refused.clone(),
    );
    r.register("active_sessions", "TCP sessions open now", m.active.clone());
    r.register(
        "sessions",
        "TCP sessions ended, by the path that carried them last and why they were copied",
        m.sessions.clone(),
    );
    r.register(
        "session_duration_seconds",
        "TCP session duration",
        m.session_seconds.clone(),
    );
    r.register(
        "udp_sessions",
        "UDP sessions opened",
        m.udp_sessions.clone(),
    );
    r.register(
        "bytes",
        "Bytes forwarded, both directions, by path (kernel or copy)",
        m.bytes.clone(),
    );
    r.register(
        "session_panics",
        "Sessions whose code panicked (a bug; each is logged)",
        m.session_panics.clone(),
    );
    r.register(
        "kernel_promotion_age_seconds",
        "TCP sessions moved from the copy path into the kernel (count), by how long they had lived",
        m.promotions.clone(),
    );
    r.register(
        "kernel_promotions_deferred",
        "Times a session due for the kernel path stayed on the copy path because it moved bytes as one bulk stream or was busy with small requests and answers",
        m.promotions_deferred.clone(),
    );
    r.register(
        "backend_connect_seconds",
        "Time to connect to a backend server, successful connects only",
        m.connect_seconds.clone(),
    );
    r.register(
        "health_checks",
        "Active health checks run, by result",
        m.health_checks.clone(),
    );
    r.register(
        "health_check_duration_seconds",
        "Active health check latency",
        m.health_check_seconds.clone(),
    );
    r.register_collector(Box::new(LiveState {
        upstreams,
        board,
        splicer,
        xdp,
    }));
    r
}

/// The Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Handles for one listener's series, taken once when the listener is (re)configured.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub active: Gauge,
    pub session_seconds: Histogram,
    pub udp_sessions: Counter,
    pub no_server: Counter,
    pub connect_failed: Counter,
    pub panicked: Counter,
    pub denied: Counter,
    pub limit_conn: Counter,
    pub proxy_protocol: Counter,
    pub max_connections: Counter,
    kernel: Counter,
    copied: [Counter; CopyReason::ALL.len()],
}

impl ListenerMetrics {
    pub fn new(listener: &str, protocol: &'static str) -> Self {
        let m = &*METRICS;
        let l = ListenerLabels {
            listener: listener.to_string(),
            protocol,
        };
        let refused = |reason| {
            m.refused.get_or_create_owned(&RefusedLabels {
                listener: listener.to_string(),
                protocol,
                reason,
            })
        };
        let path = |path, reason| {
            m.sessions.get_or_create_owned(&PathLabels {
                listener: listener.to_string(),
                protocol,
                path,
                reason,
            })
        };
        ListenerMetrics {
            accepted: m.accepted.get_or_create_owned(&l),
            active: m.active.get_or_create_owned(&l),
            session_seconds: m.session_seconds.get_or_create_owned(&l),
            udp_sessions: m.udp_sessions.get_or_create_owned(&l),
            no_server: refused("no_server"),
            connect_failed: refused("connect_failed"),
            panicked: refused("panic"),
            denied: refused("denied"),
            limit_conn: refused("limit_conn"),
            proxy_protocol: refused("proxy_protocol"),
            max_connections: refused("max_connections"),
            kernel: path("kernel", "none"),
            copied: CopyReason::ALL.map(|r| path("copy", r.as_str())),
        }
    }

    /// Counts an ended session under the path that carried it last.
    pub fn ended_on(&self, copied: Option<CopyReason>) {
        match copied {
            None => self.kernel.inc(),
            Some(r) => self.copied[r as usize].inc(),
        };
    }
}

/// Bytes forwarded by each path, counted as sessions end.
pub fn add_bytes(kernel: u64, copy: u64) {
    let m = &*METRICS;
    m.bytes
        .get_or_create(&BytesLabels { path: "kernel" })
        .inc_by(kernel);
    m.bytes
        .get_or_create(&BytesLabels { path: "copy" })
        .inc_by(copy);
}

/// One server's active health check series.
pub struct CheckSeries {
    pub seconds: Histogram,
    pub passed: Counter,
    pub failed: Counter,
}

impl CheckSeries {
    pub fn new(upstream: &str, server: &str) -> Self {
        let m = &*METRICS;
        let result = |result| CheckLabels {
            upstream: upstream.into(),
            server: server.to_string(),
            result,
        };
        CheckSeries {
            seconds: m.health_check_seconds.get_or_create_owned(&ServerLabels {
                upstream: upstream.into(),
                server: server.to_string(),
            }),
            passed: m.health_checks.get_or_create_owned(&result("pass")),
            failed: m.health_checks.get_or_create_owned(&result("fail")),
        }
    }

    /// Drops a server's check series once it is no longer checked.
    pub fn forget(upstream: &str, server: &str) {
        let m = &*METRICS;
        m.health_check_seconds.remove(&ServerLabels {
            upstream: upstream.into(),
            server: server.to_string(),
        });
        for result in ["pass", "fail"] {
            m.health_checks.remove(&CheckLabels {
                upstream: upstream.into(),
                server: server.to_string(),
                result,
            });
        }
    }
}

/// Reads per-server state and the kernel path's counters at scrape time.
struct LiveState {
    upstreams: Arc<Upstreams>,
    board: Arc<Board>,
    splicer: Option<Arc<Splicer>>,
    xdp: Option<Arc<Mutex<XdpFilter>>>,
}

impl std::fmt::Debug for LiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveState").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    upstream: Name,
    server: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    upstream: Name,
    server: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

fn emit(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A gauge read at scrape time from a count.
fn emit_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    emit(encoder, name, help, &g)
}

impl Collector for LiveState {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let active = Family::<ServerLabels, Gauge>::default();
        let total = Family::<ServerLabels, Counter>::default();
        let bytes = Family::<DirectionLabels, Counter>::default();
        let failures = Family::<ServerLabels, Counter>::default();
        let available = Family::<ServerLabels, Gauge>::default();
        let check_state = Family::<StateLabels, Gauge>::default();
        let now = std::time::Instant::now();
        for (name, up) in self.upstreams.all().iter() {
            let checked = up.config().health_check.is_some();
            for peer in &up.snapshot().peers {
                let l = ServerLabels {
                    upstream: name.as_str().into(),
                    server: peer.spec.addr.to_string(),
                };
                let s = &peer.state;
                active.get_or_create(&l).set(i64::from(s.active()));
                total.get_or_create(&l).inc_by(s.total());
                for (direction, n) in [("upload", s.bytes_up()), ("download", s.bytes_down())] {
                    bytes
                        .get_or_create(&DirectionLabels {
                            upstream: name.as_str().into(),
                            server: l.server.clone(),
                            direction,
                        })
                        .inc_by(n);
                }
                failures.get_or_create(&l).inc_by(s.connect_failures());
                let up_now = !peer.spec.down && s.is_available(now);
                available.get_or_create(&l).set(i64::from(up_now));
                if checked {
                    check_state
                        .get_or_create(&StateLabels {
                            upstream: name.as_str().into(),
                            server: l.server.clone(),
                            state: s.checks.status().as_str(),
                        })
                        .set(1);
                }
            }
        }
        let e = &mut encoder;
        emit(
            e,
            "server_active_sessions",
            "Sessions open to a server",
            &active,
        )?;
        emit(e, "server_sessions", "Sessions handed to a server", &total)?;
        emit(
            e,
            "server_bytes",
            "Bytes to (upload) and from (download) a server, counted as sessions end",
            &bytes,
        )?;
        emit(
            e,
            "server_connect_failures",
            "Failed connects to a server",
            &failures,
        )?;
        emit(
            e,
            "server_available",
            "1 when a server may take new sessions (not down, passive and active health allow it)",
            &available,
        )?;
        emit(
            e,
            "server_health_check_state",
            "Active health state of a server (the series with value 1)",
            &check_state,
        )?;
        let updates = Family::<UpstreamLabels, Counter>::default();
        let errors = Family::<UpstreamLabels, Counter>::default();
        let bad_data = Family::<UpstreamLabels, Counter>::default();
        let last_success = Family::<UpstreamLabels, Gauge>::default();
        for (upstream, status) in self.board.all() {
            let l = UpstreamLabels {
                upstream: upstream.as_str().into(),
            };
            updates
                .get_or_create(&l)
                .inc_by(status.updates.load(Ordering::Relaxed));
            errors
                .get_or_create(&l)
                .inc_by(status.errors.load(Ordering::Relaxed));
            bad_data
                .get_or_create(&l)
                .inc_by(status.bad_data.load(Ordering::Relaxed));
            last_success
                .get_or_create(&l)
                .set(i64::try_from(status.last_success_unix()).unwrap_or(i64::MAX));
        }
        emit(
            e,
            "discovery_updates",
            "Server sets a discovery source changed",
            &updates,
        )?;
        emit(
            e,
            "discovery_errors",
            "Failed discovery fetches (the last good set stays)",
            &errors,
        )?;
        emit(
            e,
            "discovery_bad_data",
            "Discovery answers whose data was unusable (counted in discovery_errors too)",
            &bad_data,
        )?;
        emit(
            e,
            "discovery_last_success_timestamp_seconds",
            "Unix time of the last good answer from a discovery source (0: none yet)",
            &last_success,
        )?;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            emit_gauge(
                e,
                "runtime_tasks",
                "Tasks alive in the daemon's runtime (a session that sleeps in the kernel has none)",
                rt.metrics().num_alive_tasks() as u64,
            )?;
        }
        if let Some(xdp) = &self.xdp {
            let dropped = xdp.lock().unwrap_or_else(|p| p.into_inner()).drops();
            let c = Counter::<u64>::default();
            c.inc_by(dropped);
            emit(
                e,
                "xdp_dropped",
                "Packets the XDP access filter dropped (denied sources)",
                &c,
            )?;
        }
        if let Some(splicer) = &self.splicer {
            let k = splicer.stats();
            let counters = [
                (
                    "kernel_pauses",
                    "Backpressure pauses of a spliced source",
                    k.pauses,
                ),
                (
                    "kernel_holds",
                    "Times a direction held (a redirect failed; the daemon forwarded what the socket got meanwhile), added as spliced sessions end",
                    k.holds,
                ),
                (
                    "kernel_trimmed_bytes",
                    "Repeated bytes the verdict cut off retransmitted skbs, added as spliced sessions end",
                    k.trimmed,
                ),
                (
                    "kernel_lag_moves",
                    "Sessions moved to the copy path because a peer lagged past the cap",
                    k.lagging,
                ),
                (
                    "kernel_watchdog_moves",
                    "Stalled sessions moved to the copy path",
                    k.watchdog,
                ),
                (
                    "kernel_insert_failures",
                    "Sessions the kernel refused to splice",
                    k.insert_failed,
                ),
                (
                    "kernel_bulk_trials",
                    "Bulk streams moved into the kernel on trial (they stay only if nearly as fast as copied)",
                    k.trials,
                ),
                (
                    "kernel_bulk_trials_lost",
                    "Bulk streams that ran slower in the kernel than copied and went back to the copy path",
                    k.trials_lost,
                ),
                (
                    "kernel_chatty_trials",
                    "Sessions busy with requests and answers moved into the kernel on trial (judged together)",
                    k.chatty_trials,
                ),
                (
                    "kernel_chatty_trials_lost",
                    "Sessions busy with requests and answers that went back to the copy path, slower in the kernel together",
                    k.chatty_trials_lost,
                ),
                (
                    "kernel_sleeps",
                    "Times a quiet spliced session gave up its task to sleep",
                    k.slept,
                ),
                (
                    "kernel_wakeups",
                    "Times a sleeping spliced session woke (an event, moved counters, its idle deadline, an upgrade or shutdown)",
                    k.wakeups,
                ),
            ];
            for (name, help, value) in counters {
                let c = Counter::<u64>::default();
                c.inc_by(value);
                emit(e, name, help, &c)?;
            }
            emit_gauge(
                e,
                "kernel_sessions",
                "Sessions in the kernel path now",
                k.sessions,
            )?;
            emit_gauge(
                e,
                "kernel_dormant_sessions",
                "Sessions in the kernel path asleep without a task (quiet ones)",
                k.dormant,
            )?;
            let maps = Family::<MapLabels, Gauge>::default();
            for (map, n) in k.maps {
                maps.get_or_create(&MapLabels { map })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            emit(
                e,
                "kernel_map_entries",
                "Entries in the kernel path's maps (watched: sockets the daemon watches)",
                &maps,
            )?;
        }
        Ok(())
    }
}
