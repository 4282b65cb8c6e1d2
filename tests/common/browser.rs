//! Headless Chromium driven over WebDriver, for the tests and the
//! benchmark of report.html: Debian's chromium and chromium-driver (which
//! `scripts/setup --with-test-services` installs), chromedriver started on
//! a free port, fantoccini as the client. The session records the
//! browser's console and its DevTools network events, so a test can see
//! every error and every request the page made.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A fresh headless browser with its own profile, `width` x `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: the report tests drive a real Chromium; run scripts/setup --with-test-services"
            );
        }
        let profile = tempfile::tempdir().unwrap();
        let mut last_error = String::new();
        // Another process can take the port between asking for it and
        // chromedriver binding it; then try another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            // Its own process group, so that the browser it starts goes
            // with it however the test ends.
            let mut driver = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .process_group(0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts");
            let started = Instant::now();
            while TcpStream::connect(("127.0.0.1", port)).is_err() && started.elapsed() < Duration::from_secs(15) {
                if driver.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let capabilities = json!({
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--hide-scrollbars", "--force-device-scale-factor=1",
                        format!("--window-size={width},{height}"),
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
                "goog:loggingPrefs": { "browser": "ALL", "performance": "ALL" },
            });
            let Value::Object(capabilities) = capabilities else { unreachable!() };
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{port}/"))
                .await
            {
                Ok(client) => return Browser { client, driver, _profile: profile },
                Err(e) => {
                    last_error = e.to_string();
                    // SAFETY: as in `Drop`: chromedriver's own process group.
                    unsafe { libc::kill(-(driver.id() as i32), libc::SIGKILL) };
                    let _ = driver.wait();
                }
            }
        }
        panic!("no WebDriver session with {CHROMIUM}: {last_error}");
    }

    /// Opens a file and waits until the report says it is drawn. The logs
    /// are drained first, so that what they hold afterwards is this page's
    /// (Chromium's own start page makes requests of its own).
    pub async fn open_report(&self, page: &Path) -> String {
        let url = format!("file://{}", page.canonicalize().unwrap().display());
        self.client.goto("about:blank").await.unwrap();
        self.log("performance").await;
        self.log("browser").await;
        self.client.goto(&url).await.unwrap();
        self.client
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css("html[data-ready]"))
            .await
            .unwrap_or_else(|e| panic!("{url} never became ready (a script error stops it drawing): {e}"));
        url
    }

    /// The console messages so far (each once: the log drains as read).
    pub async fn console(&self) -> Vec<Value> {
        self.log("browser").await
    }

    /// The URL of every request the page made so far, from the DevTools
    /// network events, the page itself included.
    pub async fn requests(&self) -> Vec<String> {
        self.log("performance")
            .await
            .iter()
            .filter_map(|entry| serde_json::from_str::<Value>(entry["message"].as_str()?).ok())
            .filter(|event| event["message"]["method"] == "Network.requestWillBeSent")
            .filter_map(|event| event["message"]["params"]["request"]["url"].as_str().map(str::to_string))
            .collect()
    }

    async fn log(&self, kind: &'static str) -> Vec<Value> {
        match self.client.issue_cmd(ReadLog(kind)).await.unwrap() {
            Value::Array(entries) => entries,
            other => panic!("chromedriver's {kind} log is not a list: {other}"),
        }
    }

    pub async fn script(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    /// Ends chromedriver and every browser process it started (a failed
    /// test never reaches `close`).
    fn drop(&mut self) {
        // SAFETY: kill(2) with a negative PID signals that process group:
        // chromedriver's, which it leads.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

/// chromedriver's log endpoint, which the W3C protocol lacks and
/// fantoccini therefore does not wrap.
#[derive(Debug)]
struct ReadLog(&'static str);

impl WebDriverCompatibleCommand for ReadLog {
    fn endpoint(&self, base_url: &url::Url, session_id: Option<&str>) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or_default()))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(json!({ "type": self.0 }).to_string()))
    }
}
