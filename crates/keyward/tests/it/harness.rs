//! `TestServer`: starts `keyward serve` as a child process and reads what it prints.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyward");

pub struct TestServer {
    child: Child,
    pub base: String,
    pub internal: String,
    pub dir: Arc<tempfile::TempDir>,
    /// The management key printed at first start (empty on a later start).
    pub mgmt_key: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    pub client: reqwest::Client,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The seconds of `Retry-After`; panics when it is missing or not a number.
    pub fn retry_after(&self) -> u64 {
        let value = self.header("retry-after").expect("a Retry-After header");
        value
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After {value:?}"))
    }

    /// The `error.code` of a nested envelope.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Asserts status and code, and that the envelope is well-formed.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(self.code(), code, "body: {}", self.text);
        let err = &self.body["error"];
        for field in ["type", "message", "request_id"] {
            assert!(
                err[field].is_string(),
                "envelope lacks {field}: {}",
                self.text
            );
        }
        assert!(err["retryable"].is_boolean(), "{}", self.text);
        assert_eq!(err["request_id"].as_str(), self.header("x-request-id"));
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json"))
        );
        if status == 401 {
            assert!(
                self.header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer"))
            );
        }
    }
}

pub fn db_url(dir: &Path) -> String {
    format!("sqlite://{}/keyward.db", dir.display())
}

fn spawn_reader(stream: impl std::io::Read + Send + 'static, sink: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..].split_whitespace().next()
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_in(Arc::new(tempfile::tempdir().unwrap()), env).await
    }

    /// Starts with a `keyward.toml` in the data directory.
    pub async fn start_with_config(toml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keyward.toml"), toml).unwrap();
        Self::start_in(Arc::new(dir), env).await
    }

    /// Starts on an existing data directory (a restart).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KEYWARD_SERVER__LISTEN", "127.0.0.1:0")
            .env("KEYWARD_SERVER__INTERNAL_LISTEN", "127.0.0.1:0")
            .env("KEYWARD_SERVER__WORKERS", "2")
            .env("KEYWARD_STORE__URL", db_url(dir.path()))
            // Everything keyward and its libraries log, so the secret checks see it all.
            .env("KEYWARD_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // A fresh store prints its management key on stderr before keyward logs that it
        // listens on stdout; the two pipes are read by separate threads, so wait for it.
        let fresh_store = !dir.path().join("keyward.db").exists();
        let mut child = cmd.spawn().expect("spawn keyward");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        spawn_reader(child.stdout.take().unwrap(), stdout.clone());
        spawn_reader(child.stderr.take().unwrap(), stderr.clone());

        let deadline = Instant::now() + Duration::from_secs(20);
        let (base, internal) = loop {
            if let Some(line) = stdout
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.contains("keyward listening"))
            {
                let public = field(line, "public").unwrap().to_owned();
                let internal = field(line, "internal").unwrap().to_owned();
                break (format!("http://{public}"), format!("http://{internal}"));
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "keyward exited with {status}\nstdout:\n{}\nstderr:\n{}",
                    stdout.lock().unwrap(),
                    stderr.lock().unwrap()
                );
            }
            assert!(Instant::now() < deadline, "keyward did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let find_key = || {
            stderr
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.starts_with("kw_"))
                .map(str::to_owned)
        };
        // Bounded: a fresh SQLite file on a store bootstrapped elsewhere (PostgreSQL) has none.
        let key_deadline = Instant::now() + Duration::from_secs(5);
        while fresh_store && find_key().is_none() && Instant::now() < key_deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mgmt_key = find_key().unwrap_or_default();
        Self {
            child,
            base,
            internal,
            dir,
            mgmt_key,
            stdout,
            stderr,
            client: reqwest::Client::new(),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("keyward.db")
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Whether `needle` shows up on stdout within 5 s: a line the server wrote before
    /// answering may still be on its way through the reader thread.
    pub async fn wait_for_stdout(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.stdout().contains(needle) {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Sends a request with optional bearer key and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        Self::read(req.send().await.unwrap()).await
    }

    /// A GET with `key` that claims to come from `client` (`X-Forwarded-For`), as a trusted
    /// proxy in front would say.
    pub async fn get_from(&self, path: &str, key: &str, client: &str) -> Reply {
        let request = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .header("X-Forwarded-For", client);
        Self::read(request.send().await.unwrap()).await
    }

    pub async fn read(resp: reqwest::Response) -> Reply {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    /// Repeats a call until it answers `status` (changes made by another process reach this
    /// server's cache within a second); returns the last reply.
    pub async fn eventually(&self, status: u16, method: Method, path: &str, key: &str) -> Reply {
        // Generous: the change feed is read every 0.5 s, but a loaded machine delays rounds,
        // and waiting costs nothing once the answer has come.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = self.call(method.clone(), path, Some(key), None).await;
            if reply.status.as_u16() == status || Instant::now() > deadline {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Management calls with the bootstrap key.
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.call(method, path, Some(&self.mgmt_key.clone()), body)
            .await
    }

    /// Creates a key through the API; returns (id, secret).
    pub async fn create_key(&self, body: Value) -> (String, String) {
        let r = self.admin(Method::POST, "/v1/keys", Some(body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        (
            r.body["id"].as_str().unwrap().to_owned(),
            r.body["key"].as_str().unwrap().to_owned(),
        )
    }

    /// Sends SIGTERM and waits for the process to end.
    /// The internal listener's Prometheus text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.internal))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stop(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return status;
            }
            if Instant::now() >= deadline {
                let out = self.stdout();
                let tail: Vec<&str> = out.lines().rev().take(40).collect();
                panic!(
                    "keyward did not stop; its last log lines:\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits, when needed, until at least `margin` is left of the current wall-clock minute.
/// The unknown-key bounds count per calendar minute: a test that fills one and then looks
/// for a refusal must not see the count start over halfway.
pub async fn well_inside_a_minute(margin: Duration) {
    well_inside_a_period(Duration::from_secs(60), margin).await;
}

/// Waits, when needed, until at least `margin` is left of the current wall-clock `period`
/// (periods counted from the Unix epoch, as credit refills and the per-minute bounds are).
pub async fn well_inside_a_period(period: Duration, margin: Duration) {
    let left = period - into_period(period);
    if left < margin {
        // Past the boundary by a little, for a server whose clock reads slightly behind.
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }
}

/// Waits until the next wall-clock `period` has begun.
pub async fn into_the_next_period(period: Duration) {
    let left = period - into_period(period);
    tokio::time::sleep(left + Duration::from_millis(50)).await;
}

fn into_period(period: Duration) -> Duration {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    Duration::from_millis((since_epoch.as_millis() % period.as_millis()) as u64)
}

/// A metric's value in Prometheus text, summed over its label sets; 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One raw HTTP/1.1 exchange, so that paths reach keyward exactly as written (HTTP clients
/// normalise `..` and `%2e%2e` themselves). Returns (status, headers and body as text).
pub async fn raw_http(
    base: &str,
    request_line_target: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req =
        format!("GET {request_line_target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Runs the CLI against a data directory; returns (exit status, stdout, stderr).
pub fn cli(
    dir: &Path,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEYWARD_STORE__URL", db_url(dir))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
