//! A redis-server of the test's own on a free loopback port.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server of the test's own, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The flag that names the port: `--port`, or `--tls-port` for TLS.
    port_flag: &'static str,
    extra: Vec<String>,
}

/// Why a launch did not give us a server.
enum Launch {
    Started(Child),
    /// Another process bound the port first.
    PortTaken,
}

impl RedisServer {
    /// A plain server; `extra` are more redis-server flags.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_on("--port", dir, extra)
    }

    /// A TLS-only server (no plaintext port); `extra` names its
    /// certificates.
    pub fn start_tls(dir: &Path, extra: &[&str]) -> Self {
        let mut flags = vec!["--port", "0"];
        flags.extend_from_slice(extra);
        Self::start_on("--tls-port", dir, &flags)
    }

    /// redis-server cannot be handed a bound socket, so the port is picked
    /// free and then released, and another test's server may bind it
    /// before ours does. Ours then exits saying so, and a new port is
    /// tried. Readiness is read from our server's own log, never from a
    /// PING, which the other test's server on the port would answer.
    fn start_on(port_flag: &'static str, dir: &Path, extra: &[&str]) -> Self {
        for _ in 0..10 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if let Some(server) = Self::try_start(port_flag, dir, port, extra) {
                return server;
            }
        }
        panic!("redis-server found 10 free ports in a row taken before it could bind them");
    }

    /// A plain server on `port`, or None if another process holds it.
    pub fn start_at(dir: &Path, port: u16, extra: &[&str]) -> Option<Self> {
        Self::try_start("--port", dir, port, extra)
    }

    fn try_start(port_flag: &'static str, dir: &Path, port: u16, extra: &[&str]) -> Option<Self> {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut server = Self { port, dir: dir.to_path_buf(), child: None, port_flag, extra };
        match server.launch() {
            Launch::Started(child) => server.child = Some(child),
            Launch::PortTaken => return None,
        }
        Some(server)
    }

    /// Starts redis-server on `self.port` and waits until its log says it
    /// accepts connections, or that the port was taken.
    fn launch(&self) -> Launch {
        let log = self.dir.join(format!("redis-{}.log", self.port));
        let mut child = Command::new("redis-server")
            .args([self.port_flag, &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Asked before the log is read, so that the log of a server
            // that has exited is read whole.
            let exited = child.try_wait().unwrap().is_some();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if exited {
                assert!(text.contains("Address already in use"), "redis-server exited on port {}:\n{text}", self.port);
                return Launch::PortTaken;
            }
            if text.contains("Ready to accept connections") {
                return Launch::Started(child);
            }
            assert!(Instant::now() < deadline, "redis-server did not start on port {} within 10 s:\n{text}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server the way an operator restart does (SIGTERM: Redis
    /// flushes its AOF), then starts it again on the same port and data.
    pub fn restart(&mut self) {
        let mut child = self.child.take().unwrap();
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        child.wait().unwrap();
        match self.launch() {
            Launch::Started(child) => self.child = Some(child),
            Launch::PortTaken => panic!("redis-server could not bind port {} again", self.port),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    }

    /// A hash as a map, via redis-cli.
    pub fn hash(&self, key: &str) -> HashMap<String, String> {
        let text = self.cli(&["--no-raw", "HGETALL", key]);
        let values: Vec<String> =
            text.lines().filter_map(|l| l.split_once(") ").map(|(_, v)| v.trim_matches('"').to_string())).collect();
        values.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].clone(), c[1].clone())).collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
