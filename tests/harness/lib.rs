//! Test harness: starts the real `fanout` binary on free loopback ports and
//! drives it with a raw WebSocket client (fastwebsockets), so tests see
//! exactly what a client on the wire sees.
//!
//! The binary is the one `cargo build --workspace` put next to the test
//! executable (`target/<profile>/fanout`), or `$FANOUT_BIN`.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode};
use http_body_util::Empty;
use hyper::Request;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of the `fanout` binary.
pub fn fanout_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FANOUT_BIN") {
        return p.into();
    }
    // A binary beside it (target/<profile>/fanout-loadtest), or a test:
    // target/<profile>/deps/<test-exe> → target/<profile>/fanout.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable's directory");
    let beside = dir.join("fanout");
    if beside.is_file() {
        return beside;
    }
    dir.parent().expect("target/<profile>").join("fanout")
}

/// The NATS settings every cluster process of a test shares: the server,
/// and a small shard layout (8 shards over 2 streams, `FANOUT_0` owning
/// shards 0-3 and `FANOUT_1` shards 4-7).
pub fn nats_args(url: &str) -> [&str; 6] {
    ["--nats-url", url, "--nats-shards", "8", "--nats-streams", "2"]
}

/// A free TCP port on 127.0.0.1 for a server a test starts.
///
/// It is chosen below the kernel's ephemeral range: a port the kernel hands
/// out for `bind(0)` can be handed out again, before the server binds it, as
/// the source port of some other process's outgoing connection (the tests
/// open thousands), which made starts fail now and then with "address
/// already in use". Below the range only another test's server can take it,
/// and random choice over some 20,000 ports makes that unlikely.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (first, last) = (10_000u16, low.saturating_sub(1));
    if last > first {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // xorshift64 seeded per call: process, time, and a call counter.
        let mut x = nanos
            ^ (u64::from(std::process::id()) << 32)
            ^ CALLS
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            | 1;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = first + (x % u64::from(last - first + 1)) as u16;
            if StdListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `fanout` process, killed on drop.
pub struct Fanout {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
}

impl Fanout {
    /// Starts `fanout standalone` with extra `args` and `env` and waits until
    /// `/healthz` answers.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_role("standalone", free_port(), args, env).await
    }

    /// Starts `fanout edge` against `nats` and waits until it is ready.
    pub async fn start_edge(nats: &Nats, args: &[&str]) -> Result<Self> {
        Self::start_edge_on(nats, free_port(), args).await
    }

    /// Starts `fanout edge` on a given public port.
    pub async fn start_edge_on(nats: &Nats, port: u16, args: &[&str]) -> Result<Self> {
        let url = nats.url();
        let mut all = nats_args(&url).to_vec();
        all.extend_from_slice(args);
        let me = Self::start_role("edge", port, &all, &[]).await?;
        me.wait_ready(Duration::from_secs(15)).await?;
        Ok(me)
    }

    /// Starts `fanout presence` (the sweeper role) against `nats` and
    /// `redis`. Its `port` is the gRPC port.
    pub async fn start_presence(nats: &Nats, redis: &Redis, args: &[&str]) -> Result<Self> {
        let (nurl, rurl) = (nats.url(), redis.url());
        let grpc_port = free_port();
        let grpc = format!("127.0.0.1:{grpc_port}");
        let mut all = nats_args(&nurl).to_vec();
        all.extend(["--redis-url", rurl.as_str(), "--presence-grpc-listen", grpc.as_str()]);
        all.extend_from_slice(args);
        let mut me = Self::start_role_admin_only("presence", &all).await?;
        // The presence role has no public listener: `port` is its gRPC port.
        me.port = grpc_port;
        me.wait_ready(Duration::from_secs(15)).await?;
        Ok(me)
    }

    /// Starts `fanout cdc` streaming `pg` into `nats`, with the workshop
    /// routes. Its `port` is unused (admin only).
    pub async fn start_cdc(nats: &Nats, pg: &Postgres, args: &[&str]) -> Result<Self> {
        let (nurl, purl) = (nats.url(), pg.url());
        let mut all = nats_args(&nurl).to_vec();
        all.extend(["--database-url", purl.as_str(), "--cdc-routes", WORKSHOP_ROUTES]);
        all.extend_from_slice(args);
        Self::start_role_admin_only("cdc", &all).await
    }

    async fn start_role_admin_only(role: &str, args: &[&str]) -> Result<Self> {
        Self::start_on(role, None, free_port(), args, &[]).await
    }

    /// Starts `fanout <role>` with its admin listener on `admin_port` and,
    /// for a role that has one, its public listener on `port`; waits until
    /// `/healthz` answers (on the public port when there is one). Fixed ports let a process be
    /// restarted where a scraper or client expects it.
    pub async fn start_on(
        role: &str,
        port: Option<u16>,
        admin_port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let bin = fanout_bin();
        anyhow::ensure!(
            bin.exists(),
            "{} not built: run `cargo build --workspace`",
            bin.display()
        );
        let mut cmd = Command::new(&bin);
        cmd.arg(role);
        if let Some(port) = port {
            cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        cmd.args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("spawning {}", bin.display()))?;
        let mut me = Self {
            child,
            port: port.unwrap_or(0),
            admin_port,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = me.child.try_wait()? {
                bail!("fanout {role} exited during start-up: {status}");
            }
            // The public listener when there is one (clients come next).
            if http_get(port.unwrap_or(admin_port), "/healthz")
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
            {
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!("fanout {role} did not answer /healthz within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if http_get(self.admin_port, "/readyz")
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("not ready within {timeout:?}")
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn is_ready(&self) -> bool {
        http_get(self.admin_port, "/readyz")
            .await
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts `fanout <role>` with its public listener on `port`, extra
    /// `args` and `env`, and waits until `/healthz` answers. Listen
    /// addresses are flags, so they win over the same settings in `env`.
    pub async fn start_role(role: &str, port: u16, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_on(role, Some(port), free_port(), args, env).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ws://127.0.0.1:<port>/realtime/v1/websocket?vsn=…&apikey=…`.
    pub fn ws_path(&self, vsn: &str, apikey: Option<&str>) -> String {
        let mut p = format!("/realtime/v1/websocket?vsn={vsn}");
        if let Some(k) = apikey {
            p.push_str("&apikey=");
            p.push_str(k);
        }
        p
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(())
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("fanout did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(self.admin_port, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private `nats-server -js` on a free port with a temp store, killed on
/// drop. `tests/run.sh` installs Debian's `nats-server` when missing.
pub struct Nats {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Nats {
    pub async fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("fanout-nats-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir)?;
        let port = free_port();
        let child = Self::spawn(&dir, port).await?;
        Ok(Self { child, port, dir })
    }

    async fn spawn(dir: &std::path::Path, port: u16) -> Result<Child> {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let mut child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {bin} (tests/run.sh installs it)"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("nats-server did not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(child)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL), keeping its store.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same store.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = Self::spawn(&self.dir, self.port).await?;
        Ok(())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private three-node JetStream cluster (`nats-server` routes on
/// loopback, one store directory per node), the production set-up the
/// README describes; killed on drop.
pub struct NatsCluster {
    nodes: Vec<Child>,
    pub ports: Vec<u16>,
    dir: PathBuf,
}

impl NatsCluster {
    pub async fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("fanout-nats-cluster-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir)?;
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|r| format!("nats-route://127.0.0.1:{r}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let conf = dir.join(format!("n{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{store}\" }}\n\
                     cluster {{\n  name: fanout\n  listen: 127.0.0.1:{route}\n  routes: [{route_list}]\n}}\n",
                    port = ports[i],
                    store = dir.join(format!("d{i}")).display(),
                    route = routes[i],
                ),
            )?;
            nodes.push(Self::spawn_node(&conf)?);
        }
        let me = Self { nodes, ports, dir };
        // Ready once JetStream answers on every node (a meta leader is elected).
        let deadline = Instant::now() + Duration::from_secs(20);
        for &port in &me.ports {
            loop {
                if let Ok(info) = nats_request(port, "$JS.API.INFO").await
                    && info.contains("\"memory\"")
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the NATS cluster's JetStream did not come up");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(me)
    }

    /// The flags that put a fanout process on this cluster: every node's
    /// URL, 8 shards in 2 streams, each stream on all 3 nodes.
    pub fn fanout_args(&self) -> Vec<String> {
        let urls = self.urls();
        [
            "--nats-url",
            &urls,
            "--nats-shards",
            "8",
            "--nats-streams",
            "2",
            "--nats-replicas",
            "3",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Every node's client URL, comma-separated (as `--nats-url` takes them).
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `i` (SIGKILL), keeping its store.
    pub fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].kill();
        let _ = self.nodes[i].wait();
    }

    /// Starts node `i` again with its configuration and store, and waits
    /// until it accepts clients (it then catches up with its peers).
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.nodes[i] = Self::spawn_node(&self.dir.join(format!("n{i}.conf")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.ports[i])).await.is_err() {
            if Instant::now() > deadline {
                bail!("nats-server n{i} did not listen on {} again", self.ports[i]);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn spawn_node(conf: &std::path::Path) -> Result<Child> {
        Command::new(nats_server_bin())
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning nats-server (tests/run.sh installs it)")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nats-server binary: `FANOUT_NATS_SERVER` if set (to run the
/// cluster tests or the chaos run against another NATS release), else
/// Debian's.
fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FANOUT_NATS_SERVER") {
        return p.into();
    }
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nats-server")
        .into()
}

/// One NATS request on a fresh connection to `port` (plain protocol, no
/// client library): the reply's payload as text.
pub async fn nats_request(port: u16, subject: &str) -> Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    lines.read_line(&mut line).await?; // INFO
    write
        .write_all(
            format!("CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.t 1\r\nPUB {subject} _INBOX.t 0\r\n\r\n").as_bytes(),
        )
        .await?;
    let reply = async {
        loop {
            line.clear();
            if lines.read_line(&mut line).await? == 0 {
                bail!("connection closed");
            }
            if line.starts_with("PING") {
                write.write_all(b"PONG\r\n").await?;
            } else if line.starts_with("MSG ") {
                let mut payload = String::new();
                lines.read_line(&mut payload).await?;
                return Ok(payload.trim_end().to_owned());
            } else if line.starts_with("-ERR") {
                bail!("{}", line.trim_end());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .context("no reply")?
}

/// A private `redis-server` on a free port (no persistence), killed on drop.
/// `tests/run.sh` installs Debian's `redis-server` when missing.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Result<Self> {
        let port = free_port();
        let child = Self::spawn(port).await?;
        Ok(Self { child, port })
    }

    async fn spawn(port: u16) -> Result<Child> {
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning redis-server (tests/run.sh installs it)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("redis-server did not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(child)
    }

    /// Kills the server (SIGKILL); it keeps nothing.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts an empty server again on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = Self::spawn(self.port).await?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a counter or gauge from metrics text: `name` sums every label
/// set, `name{label="value"}` reads that one series.
pub fn metric_value(text: &str, name: &str) -> f64 {
    let next: &[char] = if name.ends_with('}') { &[' '] } else { &[' ', '{'] };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(next))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP/1.1 GET on 127.0.0.1; returns (status, body).
/// A raw WebSocket upgrade request for `path` (from `local`, with
/// `extra_headers` lines such as `"Origin: https://x\r\n"`); the server's
/// answer: status line, headers and, for a refusal, its body. An accepted
/// upgrade (101) is returned once its headers are in; the socket is then
/// dropped.
pub async fn handshake_answer(
    port: u16,
    local: Option<std::net::IpAddr>,
    path: &str,
    extra_headers: &str,
) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = match local {
        None => TcpStream::connect(("127.0.0.1", port)).await?,
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(std::net::SocketAddr::new(ip, 0))?;
            sock.connect(([127, 0, 0, 1], port).into()).await?
        }
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await?;
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if n == 0 {
                return anyhow::Ok(());
            }
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end].to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if head.starts_with("http/1.1 101") || length.is_some_and(|l| answer.len() >= end + 4 + l) {
                    return Ok(());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("no whole handshake answer within 5 s")??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_request(port, "GET", path, &[], Bytes::new()).await
}

/// A plain HTTP/1.1 request on 127.0.0.1; returns (status, body).
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, String)> {
    use http_body_util::{BodyExt, Full};
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{port}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

/// What a client received.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, String),
}

/// A raw WebSocket client.
pub struct WsClient {
    ws: FragmentCollector<TokioIo<Upgraded>>,
}

impl WsClient {
    /// Connects to `path` on 127.0.0.1:`port`.
    pub async fn connect(port: u16, path: &str) -> Result<Self> {
        Self::connect_from(port, path, None).await
    }

    /// Connects from a given local address (to spread over 127.0.0.x).
    pub async fn connect_from(port: u16, path: &str, local: Option<std::net::IpAddr>) -> Result<Self> {
        let stream = match local {
            None => TcpStream::connect(("127.0.0.1", port)).await?,
            Some(ip) => {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.bind(std::net::SocketAddr::new(ip, 0))?;
                sock.connect(([127, 0, 0, 1], port).into()).await?
            }
        };
        let req = Request::builder()
            .method("GET")
            .uri(path)
            .header("host", format!("127.0.0.1:{port}"))
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-key", fastwebsockets::handshake::generate_key())
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())?;
        let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
            .await
            .map_err(|e| anyhow!("handshake: {e}"))?;
        Ok(Self {
            ws: FragmentCollector::new(ws),
        })
    }

    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.ws
            .write_frame(Frame::text(fastwebsockets::Payload::Borrowed(text.as_bytes())))
            .await?;
        Ok(())
    }

    pub async fn send_json(&mut self, v: &Value) -> Result<()> {
        self.send_text(&v.to_string()).await
    }

    /// Sends `text` as a message split into frames of at most `chunk` bytes
    /// (a first text frame, then continuation frames).
    pub async fn send_fragmented(&mut self, text: &str, chunk: usize) -> Result<()> {
        let parts: Vec<&[u8]> = text.as_bytes().chunks(chunk.max(1)).collect();
        for (i, part) in parts.iter().enumerate() {
            let opcode = if i == 0 { OpCode::Text } else { OpCode::Continuation };
            let fin = i + 1 == parts.len();
            self.ws
                .write_frame(Frame::new(fin, opcode, None, fastwebsockets::Payload::Borrowed(part)))
                .await?;
        }
        Ok(())
    }

    pub async fn send_binary(&mut self, b: &[u8]) -> Result<()> {
        self.ws
            .write_frame(Frame::binary(fastwebsockets::Payload::Borrowed(b)))
            .await?;
        Ok(())
    }

    /// The next data or close frame, within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Received> {
        let frame = tokio::time::timeout(timeout, self.ws.read_frame())
            .await
            .map_err(|_| anyhow!("nothing received within {timeout:?}"))??;
        Ok(match frame.opcode {
            OpCode::Text => Received::Text(String::from_utf8(frame.payload.to_vec())?),
            OpCode::Binary => Received::Binary(frame.payload.to_vec()),
            OpCode::Close => {
                let p = frame.payload.to_vec();
                let code = if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                };
                Received::Close(code, String::from_utf8_lossy(p.get(2..).unwrap_or(&[])).into_owned())
            }
            other => bail!("unexpected frame {other:?}"),
        })
    }

    /// The next text frame as JSON (vsn 1.0.0 objects or 2.0.0 arrays).
    pub async fn recv_json(&mut self, timeout: Duration) -> Result<Value> {
        match self.recv(timeout).await? {
            Received::Text(t) => Ok(serde_json::from_str(&t)?),
            other => bail!("expected a text frame, got {other:?}"),
        }
    }

    /// Receives until `pred` matches a JSON message; returns it.
    pub async fn recv_until(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.recv_json(left).await?;
            if pred(&v) {
                return Ok(v);
            }
        }
    }

    /// Whether `timeout` passes with no message matching `pred` (a closed
    /// connection counts as none).
    pub async fn nothing_within(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        self.recv_until(timeout, pred).await.is_err()
    }
}

/// A vsn 1.0.0 message.
pub fn v1(topic: &str, event: &str, payload: Value, r#ref: &str) -> Value {
    serde_json::json!({"topic": topic, "event": event, "payload": payload, "ref": r#ref, "join_ref": r#ref})
}

/// Joins `topic` over vsn 1.0.0 and waits for the ok reply.
pub async fn join_v1(c: &mut WsClient, topic: &str, config: Value, r#ref: &str) -> Result<Value> {
    c.send_json(&v1(topic, "phx_join", serde_json::json!({"config": config}), r#ref))
        .await?;
    let reply = c
        .recv_until(Duration::from_secs(5), |v| {
            v["event"] == "phx_reply" && v["ref"] == r#ref
        })
        .await?;
    anyhow::ensure!(reply["payload"]["status"] == "ok", "join refused: {reply}");
    Ok(reply)
}

/// A private PostgreSQL cluster in a temp dir (initdb + pg_ctl, run as the
/// `postgres` user when the tests run as root), listening on a free
/// loopback port with `wal_level = logical`. Stopped (immediate) on drop.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl Postgres {
    /// A cluster set up for logical replication.
    pub async fn start() -> Result<Self> {
        Self::start_with("logical").await
    }

    /// A cluster with the given `wal_level` (to test setup errors).
    pub async fn start_with(wal_level: &str) -> Result<Self> {
        let bin = Self::bin_dir()?;
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fanout-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pg = Self { port, dir, bin };
        pg.as_owner(&["chown", "-R", "postgres:postgres"], true)?;
        let data = pg.dir.join("data");
        pg.run(
            &pg.bin.join("initdb"),
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ],
        )?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level={wal_level} -c max_replication_slots=20 \
             -c max_wal_senders=20 -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            pg.dir.display()
        );
        pg.pg_ctl("start", &["-o", &opts], 30)?;
        Ok(pg)
    }

    /// The newest installed server's bin dir.
    fn bin_dir() -> Result<PathBuf> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL server not installed (tests/run.sh installs it)")?
            .filter_map(|e| {
                let e = e.ok()?;
                let v: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, b)| b)
            .ok_or_else(|| anyhow!("no initdb under /usr/lib/postgresql/*/bin"))
    }

    fn is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }

    /// Runs `cmd dir` (root only: hands the dir to postgres).
    fn as_owner(&self, cmd: &[&str], only_root: bool) -> Result<()> {
        if only_root && !Self::is_root() {
            return Ok(());
        }
        let status = Command::new(cmd[0]).args(&cmd[1..]).arg(&self.dir).status()?;
        if !status.success() {
            bail!("{cmd:?} failed");
        }
        Ok(())
    }

    /// Runs a server program, as `postgres` when we are root.
    fn run(&self, program: &std::path::Path, args: &[&str]) -> Result<String> {
        let mut cmd = if Self::is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}{}",
                program.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Restarts the server (`pg_ctl restart -m fast`: sessions are ended,
    /// everything committed is kept) with the options it was started with;
    /// an error if it does not shut down within 90 s. (A walsender can hold
    /// a fast shutdown until `wal_sender_timeout`, 60 s, waiting for its
    /// client to confirm WAL; the chaos run shows that as a long restart.)
    pub fn restart(&self) -> Result<()> {
        self.restart_mode("fast", 90)
    }

    /// A fast restart that fails unless the server shut down and started
    /// again within `timeout_secs` (to show nothing holds the shutdown).
    pub fn restart_within(&self, timeout_secs: u32) -> Result<()> {
        self.restart_mode("fast", timeout_secs)
    }

    /// Restarts the server after an immediate shutdown (no checkpoint, as
    /// after a crash; recovery replays the WAL on start).
    pub fn restart_immediate(&self) -> Result<()> {
        self.restart_mode("immediate", 90)
    }

    fn restart_mode(&self, mode: &str, timeout_secs: u32) -> Result<()> {
        self.pg_ctl("restart", &["-m", mode], timeout_secs)
    }

    /// `pg_ctl <action>` on this cluster's data dir and log, waiting at
    /// most `timeout_secs`; a failure carries the end of the server's log.
    fn pg_ctl(&self, action: &str, extra: &[&str], timeout_secs: u32) -> Result<()> {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let log = self.dir.join("log").to_string_lossy().into_owned();
        let timeout = timeout_secs.to_string();
        let mut args = vec!["-D", &data, "-l", &log, "-w", "-t", &timeout];
        args.extend_from_slice(extra);
        args.push(action);
        self.run(&self.bin.join("pg_ctl"), &args).map_err(|e| {
            // What the server was waiting for is in its own log.
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            e.context(format!("the server's log ends:\n{}", tail.join("\n")))
        })?;
        Ok(())
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL with psql (stop on error, unaligned tuples-only output).
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", &self.url(), "-c", sql])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Applies `deploy/sql/workshop.sql`.
    pub fn apply_workshop_schema(&self) -> Result<()> {
        let file = repo_root().join("deploy/sql/workshop.sql");
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &self.url(), "-f"])
            .arg(&file)
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("workshop schema: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.run(
            &self.bin.join("pg_ctl"),
            &["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The routes of the workshop schema (see deploy/sql/workshop.sql).
pub const WORKSHOP_ROUTES: &str = "public.workshop_participants=workshop:{session_id},\
public.workshop_activities=workshop:{session_id},public.workshop_stage_submissions=workshop:{session_id}";

/// Runs `fanout cdc` against `nats_url` and `database_url` (with `args`)
/// until it exits, at most 30 s: for setup problems, which it must report
/// instead of retrying. Returns its exit code and stderr.
pub async fn run_cdc_to_exit(nats_url: &str, database_url: &str, args: &[&str]) -> Result<(Option<i32>, String)> {
    let child = tokio::process::Command::new(fanout_bin())
        .args(["cdc", "--nats-url", nats_url, "--database-url", database_url])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .context("fanout cdc kept running instead of reporting the setup problem")??;
    Ok((out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// The membership set of the workshop schema: a user's workshops are the
/// `session_id`s of their `workshop_participants` rows.
pub const WORKSHOP_MEMBERSHIPS: &str =
    "{workshops = {table = 'public.workshop_participants', user = 'user_id', value = 'session_id'}}";

/// An HS256 token for `sub`, valid for ten minutes, signed with `secret`.
pub fn hs256_token(secret: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}
