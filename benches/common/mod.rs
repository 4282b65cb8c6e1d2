//! Helpers the benchmarks share: settings from the environment, the smoke
//! mode, and the process's peak memory.

#![allow(dead_code)]

/// A redis-server of the benchmark's own, as the tests start theirs.
#[path = "../../tests/common/redis_server.rs"]
pub mod redis_server;

/// Whether the benchmark runs as a smoke test (`cargo bench --bench NAME
/// -- --smoke`): every code path, its peer's included, at tiny sizes, in a
/// few seconds, so that CI sees a benchmark that no longer builds or runs.
/// Its figures mean nothing.
pub fn smoke() -> bool {
    std::env::args().any(|arg| arg == "--smoke")
}

/// A numeric setting from the environment, or its default: `full`
/// normally, `tiny` in the smoke mode.
pub fn env_usize(name: &str, full: usize, tiny: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(if smoke() { tiny } else { full })
}

/// Says that the smoke run leaves out a peer this machine lacks, and how
/// to install it; a full run without its peer is an error instead, since
/// its figures are ratios against the peer.
pub fn peer_missing(peer: &str, install: &str) {
    if smoke() {
        println!("  SKIPPED the peer half: {peer} is not installed (scripts/setup does not install it; {install})");
    } else {
        panic!("{peer} is not installed: {install}");
    }
}

/// The process's peak resident memory (VmHWM) in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the peak so the next `peak_rss_mb` covers only what follows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
