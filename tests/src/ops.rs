//! The ops port from outside: plain HTTP GETs (hyper's HTTP/1 client), and a real Prometheus server (Debian's
//! `prometheus` package) scraping a cluster, queried through its HTTP API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};

use crate::wait;

/// Time one ops request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET http://addr{path}`: the status code and the body as text.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let request = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driver = tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        driver.abort();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| {
            anyhow::anyhow!("GET {path} on {addr}: no answer within {REQUEST_TIMEOUT:?}")
        })?
}

/// The value of the sample `name` (exactly, without labels) in a text exposition.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Path of a system tool from a Debian package the test script installs, with a clear message when missing.
pub fn system_tool(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    anyhow::bail!(
        "{name} is not installed: apt-get install {package} (scripts/test.sh installs it)"
    )
}

/// `promtool check metrics` on an exposition: its findings, empty when the text passes.
pub fn promtool_check_metrics(exposition: &str) -> anyhow::Result<String> {
    use std::io::Write;
    let promtool = system_tool("promtool", "prometheus")?;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(exposition.as_bytes())?;
    let output = child.wait_with_output()?;
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(findings.trim().to_string())
    } else {
        anyhow::bail!(
            "promtool check metrics failed ({}):\n{findings}",
            output.status
        )
    }
}

/// A Prometheus server scraping the given ops ports every 500 ms; stopped when dropped.
pub struct Prometheus {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port and waits until it is ready.
    pub async fn start(targets: &[SocketAddr]) -> anyhow::Result<Self> {
        let binary = system_tool("prometheus", "prometheus")?;
        let dir = tempfile::tempdir()?;
        let targets: Vec<String> = targets.iter().map(|addr| format!("'{addr}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n  evaluation_interval: 500ms\nscrape_configs:\n  - job_name: vesper\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        // Prometheus cannot report a port the system picked, so a free one is taken and released just before;
        // another program taking it in between makes start-up fail, and the next attempt picks another.
        let mut last_error = None;
        for _ in 0..3 {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
            let child = tokio::process::Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("start prometheus")?;
            let process = std::cell::RefCell::new(child);
            let ready = wait::until(
                "prometheus to be ready",
                Duration::from_secs(60),
                || async {
                    let exited = process.borrow_mut().try_wait()?;
                    if let Some(status) = exited {
                        anyhow::bail!("prometheus exited ({status})");
                    }
                    Ok(matches!(get(addr, "/-/ready").await, Ok((200, _))).then_some(()))
                },
            )
            .await;
            let mut child = process.into_inner();
            match ready {
                Ok(()) => {
                    return Ok(Self {
                        child,
                        addr,
                        _dir: dir,
                    })
                }
                Err(error) => {
                    let log = std::fs::read_to_string(dir.path().join("prometheus.log"))
                        .unwrap_or_default();
                    last_error = Some(error.context(log));
                    let _ = child.kill().await;
                }
            }
        }
        Err(last_error.expect("three attempts were made"))
    }

    /// The result of instant query `query`: each series' labels and value.
    pub async fn query(&self, query: &str) -> anyhow::Result<Vec<(serde_json::Value, f64)>> {
        let mut encoded = String::new();
        for byte in query.bytes() {
            if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
                encoded.push(byte as char);
            } else {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
        let (status, body) = get(self.addr, &format!("/api/v1/query?query={encoded}")).await?;
        anyhow::ensure!(status == 200, "query {query}: HTTP {status}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        let results = answer["data"]["result"]
            .as_array()
            .with_context(|| format!("query {query}: no result in {body}"))?;
        results
            .iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .with_context(|| format!("no value in {series}"))?
                    .parse::<f64>()?;
                Ok((series["metric"].clone(), value))
            })
            .collect()
    }

    /// The single value of `query` (a sum, a count), or `None` when it has no result yet.
    pub async fn scalar(&self, query: &str) -> anyhow::Result<Option<f64>> {
        Ok(self.query(query).await?.first().map(|(_, value)| *value))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
