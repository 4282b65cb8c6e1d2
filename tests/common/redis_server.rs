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
    extra: Vec<String>,
}

impl RedisServer {
    /// Tests run in parallel and each picks a free port, so another server
    /// may take the port between the pick and redis-server's bind: then
    /// redis-server exits, and a new port is tried.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut server = Self { port, dir: dir.to_path_buf(), child: None, extra: extra.clone() };
            if server.launch() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts redis-server on `self.port`; false if it could not bind it.
    fn launch(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            // Our server answers PING (asking for the password, if it has
            // one); another process on the port would not.
            let ping = Command::new("redis-cli").args(["-p", &self.port.to_string(), "ping"]).output().unwrap();
            let answer = String::from_utf8_lossy(&ping.stdout).to_string() + &String::from_utf8_lossy(&ping.stderr);
            if answer.trim() == "PONG" || answer.contains("NOAUTH") {
                break;
            }
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        true
    }

    /// Stops the server the way an operator restart does (SIGTERM: Redis
    /// flushes its AOF), then starts it again on the same port and data.
    pub fn restart(&mut self) {
        let mut child = self.child.take().unwrap();
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        child.wait().unwrap();
        assert!(self.launch(), "redis-server could not bind port {} again", self.port);
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

/// Waits until a freshly started redis-server accepts connections.
pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
