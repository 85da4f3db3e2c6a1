//! nginx's main context and `events { }`: process settings that become `[global]`.

use super::convert::Converter;
use super::emit;
use super::parser::Directive;
use super::values::{duration, single};

/// Main-context directives l4lb has no use for, and why.
fn main_ignored(name: &str) -> Option<&'static str> {
    Some(match name {
        "user" => "l4lb runs as the user that starts it (set User= in its service unit)",
        "pid" => "set [global] pid_file if scripts read the pid; a service manager tracks the process without one",
        "worker_rlimit_nofile" => {
            "l4lb keeps the open-file limit it is started with (LimitNOFILE= in systemd, ulimit -n)"
        }
        "daemon" | "master_process" => "l4lb is one process and stays in the foreground",
        "worker_cpu_affinity" | "worker_priority" => {
            "l4lb does not pin or renice its threads (use the service manager, taskset, nice)"
        }
        "working_directory" | "worker_rlimit_core" => {
            "l4lb does not change its directory or core-dump limit"
        }
        "env" => "l4lb neither clears nor sets environment variables",
        "pcre_jit" => "l4lb uses no regular expressions",
        "timer_resolution" | "lock_file" | "thread_pool" | "worker_aio_requests" => {
            "l4lb's event loop and threads are tokio's"
        }
        "load_module" => {
            "l4lb loads no modules; directives of modules it lacks are reported where they are used"
        }
        "ssl_engine" => "l4lb does no TLS",
        _ => return None,
    })
}

/// `events { }` directives other than worker_connections.
fn events_ignored(name: &str) -> Option<&'static str> {
    matches!(
        name,
        "use"
            | "multi_accept"
            | "accept_mutex"
            | "accept_mutex_delay"
            | "debug_connection"
            | "worker_aio_requests"
    )
    .then_some("l4lb's event loop is tokio's (epoll); it needs no tuning")
}

/// nginx levels as l4lb levels, most verbose first in nginx's order.
fn log_level(nginx: &str) -> Option<&'static str> {
    Some(match nginx {
        "debug" => "debug",
        // l4lb has no notice level: info keeps those messages.
        "info" | "notice" => "info",
        "warn" => "warn",
        // l4lb's least verbose level is error.
        "error" | "crit" | "alert" | "emerg" => "error",
        _ => return None,
    })
}

impl Converter {
    pub fn main_context(&mut self, directives: &[Directive]) {
        let mut worker_processes: Option<(Option<usize>, &Directive)> = None;
        let mut worker_connections: Option<(usize, &Directive)> = None;
        for d in directives {
            match d.name.as_str() {
                "stream" => self.stream_block(d),
                "http" | "mail" => self.ignore(
                    d,
                    &format!("l4lb is a layer-4 proxy; the {} block is skipped", d.name),
                ),
                "events" => {
                    for e in self.block_of(d) {
                        if e.name == "worker_connections" {
                            match single(e).and_then(|v| {
                                v.parse::<usize>()
                                    .map_err(|_| format!("{v:?}: expected a number"))
                            }) {
                                Ok(n) => worker_connections = Some((n, e)),
                                Err(m) => self.error(e, m),
                            }
                        } else if let Some(why) = events_ignored(&e.name) {
                            self.ignore(e, why);
                        } else {
                            self.error(e, "unknown directive in events");
                        }
                    }
                }
                "worker_processes" => match single(d) {
                    Ok("auto") => worker_processes = Some((None, d)),
                    Ok(v) => match v.parse::<usize>() {
                        Ok(n) if n > 0 => worker_processes = Some((Some(n), d)),
                        _ => self.error(d, format!("{v:?}: expected a number or auto")),
                    },
                    Err(m) => self.error(d, m),
                },
                "worker_shutdown_timeout" => match single(d).and_then(duration) {
                    Ok(v) => self.set_global("worker_shutdown_timeout", v, d),
                    Err(m) => self.error(d, m),
                },
                "error_log" => self.error_log(d),
                name => match main_ignored(name) {
                    Some(why) => self.ignore(d, why),
                    None => self.error(d, "unknown directive in the main context"),
                },
            }
        }
        if let Some((n, d)) = worker_processes {
            match n {
                Some(n) => self.set_global_with(
                    "worker_threads",
                    emit::value(toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))),
                    format!(
                        "worker_processes {n} ({}): l4lb is one process with {n} threads",
                        d.loc
                    ),
                ),
                None => self.ignore(
                    d,
                    "auto: l4lb runs one thread per core by default (worker_threads unset)",
                ),
            }
        }
        if let Some((n, d)) = worker_connections {
            self.max_connections(n, d, worker_processes.map(|(p, _)| p));
        }
    }

    /// nginx's worker_connections is per worker process and counts the connection to the
    /// upstream server as well as the client's; l4lb's max_connections counts client
    /// connections for the whole process. So: worker_connections x workers / 2.
    fn max_connections(
        &mut self,
        per_worker: usize,
        d: &Directive,
        workers: Option<Option<usize>>,
    ) {
        let (workers, how) = match workers {
            None => (1, "1 worker (nginx's default)".to_string()),
            Some(Some(n)) => (n, format!("{n} worker_processes")),
            Some(None) => {
                // auto: nginx starts one worker per core of the host it runs on; the
                // importing host is the best guess available here, and the comment says so.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                self.warn(
                    d,
                    &format!("max_connections counts worker_processes auto as the {cores} cores of this host; adjust it for the host l4lb runs on"),
                );
                (
                    cores,
                    format!(
                        "worker_processes auto, counted as the {cores} cores of the importing host"
                    ),
                )
            }
        };
        let total =
            (per_worker.saturating_mul(workers) / 2).clamp(1, crate::config::MAX_CONNECTIONS);
        self.set_global_with(
            "max_connections",
            emit::value(toml::Value::Integer(i64::try_from(total).unwrap_or(i64::MAX))),
            format!(
                "worker_connections {per_worker} ({}) x {how} / 2: nginx counts both sides of a session",
                d.loc
            ),
        );
    }

    /// `error_log FILE [LEVEL]`: the level is kept (the most verbose when there are
    /// several), the file is not: l4lb logs to stderr.
    pub fn error_log(&mut self, d: &Directive) {
        let level = match d.args.as_slice() {
            [_] => "error", // nginx's default level
            [_, level] => match log_level(level) {
                Some(l) => l,
                None => return self.error(d, format!("{level:?}: unknown log level")),
            },
            _ => return self.error(d, "takes a file and an optional level"),
        };
        if d.args.first().is_some_and(|f| f != "stderr") {
            self.ignore(d, "the file: l4lb logs to stderr (the level is kept)");
        }
        const ORDER: [&str; 4] = ["error", "warn", "info", "debug"];
        let rank = |l: &str| ORDER.iter().position(|o| *o == l).unwrap_or(0);
        if self
            .log_level
            .is_some_and(|current| rank(current) >= rank(level))
        {
            return;
        }
        self.log_level = Some(level);
        self.set_global("log_level", emit::string(level), d);
    }
}
