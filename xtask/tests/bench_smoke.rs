//! Smoke test of `cargo xtask bench`: a quick l4lb-copy vs direct run must produce a
//! well-formed Markdown table, valid JSON and a PNG. It runs the real tools (iperf3,
//! redis-benchmark, sysbench, mariadbd), which the harness installs if missing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Cold release build of l4lb plus a ~30 s quick run; generous for a fresh machine.
const LIMIT: Duration = Duration::from_secs(900);

#[test]
fn quick_bench_writes_table_json_and_chart() {
    let out = tempfile::tempdir().expect("tempdir");
    let log = out.path().join("xtask.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "bench",
            "--quick",
            "--contenders",
            "l4lb-copy,direct",
            "--out",
        ])
        .arg(out.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out.path().join("stdout.txt")).expect("stdout file"))
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the xtask binary");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for xtask") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "xtask bench --quick ran over {LIMIT:?}; log:\n{}",
                read(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "`cargo xtask bench --quick --contenders l4lb-copy,direct` failed ({status}); \
         a missing tool (iperf3, redis-benchmark, sysbench, mariadbd) shows here:\n{}",
        tail(&read(&log), 60)
    );

    let md = read(&out.path().join("results.md"));
    let rows = results_table(&md);
    assert_eq!(rows.len(), 2, "one row per contender:\n{md}");
    for (row, name) in rows.iter().zip(["l4lb-copy", "direct"]) {
        assert!(row[0].starts_with(name), "row {row:?} should be {name}");
        for (i, cell) in row.iter().enumerate().skip(1) {
            // direct has no balancer, so no balancer memory per idle connection.
            let may_be_na = name == "direct" && cell == "n/a";
            assert!(
                may_be_na || leading_number(cell).is_some(),
                "column {i} of {name} is not a number: {cell:?}\n{md}"
            );
        }
    }

    let json: serde_json::Value =
        serde_json::from_str(&read(&out.path().join("results.json"))).expect("valid JSON");
    let samples = json["samples"].as_array().expect("samples array");
    // direct skips the idle workload: 7 workloads for l4lb-copy, 6 for direct.
    assert_eq!(samples.len(), 13, "samples: {samples:?}");
    for s in samples {
        assert!(s["error"].is_null(), "failed sample: {s}");
        assert!(
            s["metrics"].as_object().is_some_and(|m| !m.is_empty()),
            "{s}"
        );
    }
    // A PING session and iperf3's control and data sessions, all on the copy path.
    assert_eq!(json["l4lb_paths"]["l4lb-copy"], "copy:splice_off 3/3");

    let png = std::fs::read(out.path().join("throughput.png")).expect("PNG written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The cells of the table under "## Results", header and separator excluded.
fn results_table(md: &str) -> Vec<Vec<String>> {
    let mut lines = md
        .lines()
        .skip_while(|l| !l.starts_with("## Results"))
        .skip_while(|l| !l.starts_with('|'));
    let header = lines.next().expect("a table under ## Results");
    assert!(header.starts_with("| contender |"), "header row: {header}");
    let separator = lines.next().expect("separator row");
    assert!(separator.starts_with("|---|"), "separator row: {separator}");
    let width = header.matches('|').count();
    lines
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            assert_eq!(l.matches('|').count(), width, "row width: {l}");
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// "21.3 (20.1–22.0)" -> 21.3.
fn leading_number(cell: &str) -> Option<f64> {
    cell.split_whitespace().next()?.parse().ok()
}
