//! A real cluster on loopback for system tests: `celer meta serve` and N
//! `celer node serve` child processes, each node behind fault proxies (its
//! data port, and its link to the control service), so tests can SIGKILL,
//! restart and partition nodes.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celer_meta::client::MetaClient;
use celer_route::RouteTable;

use super::proxy::FaultProxy;

pub const TOKEN: &str = "cluster-test-token";

/// Whether the control process at `addr` answers as leader (HTTP 200 to
/// an authenticated `GET /v1/status`; followers answer 503). Plain TCP: a
/// MetaClient would follow a follower to the leader.
fn leads(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    if write!(
        s,
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

/// A loopback port reserved for this test process (see celer-ports: no
/// test beside this one gets it, even while a killed node is down).
pub fn free_port() -> SocketAddr {
    celer_ports::reserve().expect("reserve a loopback port")
}

pub struct NodeProc {
    pub index: usize,
    pub disk: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub data_proxy: FaultProxy,
    pub meta_proxy: FaultProxy,
    pub child: Option<Child>,
    pub log: PathBuf,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub meta_addr: SocketAddr,
    pub meta: Option<Child>,
    /// The control service's command line (one process, redb).
    meta_args: Vec<String>,
    /// With `ClusterOpts::etcd`: every control process (address, child) and
    /// the etcd members; `meta`/`meta_addr` are then unused.
    pub metas: Vec<(SocketAddr, Option<Child>)>,
    pub etcds: Vec<Child>,
    pub nodes: Vec<NodeProc>,
    pub lease_ms: u64,
    pub disk_bytes: u64,
    pub tls_creds: Option<PathBuf>,
}

pub struct ClusterOpts {
    pub nodes: usize,
    pub partition_bits: u8,
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub disk_bytes: u64,
    /// Control service on a 3-member etcd cluster with 2 control processes
    /// (nodes talk to both, no proxy on that link).
    pub etcd: bool,
    /// Every node's disk in one directory (`disks/node{i}.img`), which is
    /// then every node's default state directory too.
    pub disks_in_one_dir: bool,
    /// `--down-grace-s`: 0 (a down node leaves its partitions at once, as
    /// the tests written before the grace period expect) unless set.
    pub down_grace_s: u64,
    /// Data TLS: every node gets `--tls-creds DIR` (server and client
    /// pairs and the CA, as `celer node serve` wants them).
    pub tls_creds: Option<PathBuf>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            nodes: 4,
            partition_bits: 5,
            heartbeat_ms: 100,
            lease_ms: 800,
            disk_bytes: 320 << 20,
            etcd: false,
            disks_in_one_dir: false,
            down_grace_s: 0,
            tls_creds: None,
        }
    }
}

impl Cluster {
    pub fn start(bin: &Path, o: ClusterOpts) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta_addr = free_port();
        let mut c = Cluster {
            dir,
            bin: bin.to_path_buf(),
            meta_addr,
            meta: None,
            meta_args: Vec::new(),
            metas: Vec::new(),
            etcds: Vec::new(),
            nodes: Vec::new(),
            lease_ms: o.lease_ms,
            disk_bytes: o.disk_bytes,
            tls_creds: o.tls_creds.clone(),
        };
        if o.etcd {
            c.start_etcd_metas(&o);
        } else {
            c.start_meta(&o);
        }
        for i in 0..o.nodes {
            c.push_node(o.disks_in_one_dir);
            c.spawn_node(i, o.disk_bytes);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(t) = c.meta_client().route() {
                if t.nodes.iter().filter(|n| n.up).count() == o.nodes {
                    break;
                }
            }
            if Instant::now() > deadline {
                let logs = c.keep_logs();
                panic!("cluster did not form; logs in {}", logs.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn start_meta(&mut self, o: &ClusterOpts) {
        self.meta_args = vec![
            "meta".into(),
            "serve".into(),
            "--listen".into(),
            self.meta_addr.to_string(),
            "--data".into(),
            self.dir.path().join("meta").display().to_string(),
            "--token".into(),
            TOKEN.into(),
            "--heartbeat-ms".into(),
            o.heartbeat_ms.to_string(),
            "--lease-ms".into(),
            o.lease_ms.to_string(),
            "--partition-bits".into(),
            o.partition_bits.to_string(),
            "--down-grace-s".into(),
            o.down_grace_s.to_string(),
        ];
        self.spawn_meta();
    }

    fn spawn_meta(&mut self) {
        let meta_log = self.dir.path().join("meta.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&meta_log)
            .expect("log");
        let meta = Command::new(&self.bin)
            .args(&self.meta_args)
            .env("CELER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn meta");
        self.meta = Some(meta);
    }

    /// Kills (SIGKILL) the control service (one process, redb).
    pub fn kill_meta(&mut self) {
        if let Some(mut m) = self.meta.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }

    /// Starts the control service again on its address and metadata
    /// (after `kill_meta`), and waits until it answers.
    pub fn restart_meta(&mut self) {
        assert!(self.meta.is_none(), "the control service still runs");
        self.spawn_meta();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.meta_client().route().is_err() {
            assert!(
                Instant::now() < deadline,
                "the control service did not answer again"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// 3 etcd members and 2 `celer meta serve --store etcd` processes.
    fn start_etcd_metas(&mut self, o: &ClusterOpts) {
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect(
                "etcd is installed (apt-get install etcd-server; scripts/install-deps.sh does)",
            );
        let peers: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
        let clients: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
        let initial: Vec<String> = (0..3)
            .map(|i| format!("e{i}=http://{}", peers[i]))
            .collect();
        for i in 0..3 {
            let client = format!("http://{}", clients[i]);
            let peer = format!("http://{}", peers[i]);
            let child = Command::new(etcd)
                .args(["--name", &format!("e{i}"), "--data-dir"])
                .arg(self.dir.path().join(format!("etcd{i}")))
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args([
                    "--initial-cluster-token",
                    &format!("celer-{}", std::process::id()),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd");
            self.etcds.push(child);
        }
        let endpoints: Vec<String> = clients.iter().map(|c| format!("http://{c}")).collect();
        for k in 0..2 {
            let addr = free_port();
            let log = self.dir.path().join(format!("meta{k}.log"));
            let child = Command::new(&self.bin)
                .args([
                    "meta",
                    "serve",
                    "--store",
                    "etcd",
                    "--etcd",
                    &endpoints.join(","),
                ])
                .args(["--listen", &addr.to_string()])
                .args(["--advertise", &format!("http://{addr}")])
                .args(["--token", TOKEN])
                .args(["--heartbeat-ms", &o.heartbeat_ms.to_string()])
                .args(["--lease-ms", &o.lease_ms.to_string()])
                .args(["--partition-bits", &o.partition_bits.to_string()])
                .env("CELER_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log"))
                .spawn()
                .expect("spawn meta");
            self.metas.push((addr, Some(child)));
        }
    }

    /// Kills (SIGKILL) the control process that leads; returns its index.
    pub fn kill_meta_leader(&mut self) -> usize {
        let leader = self.meta_leader(Duration::from_secs(20));
        if let Some(mut c) = self.metas[leader].1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        leader
    }

    /// The index of the control process answering as leader.
    pub fn meta_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            for (i, (addr, child)) in self.metas.iter().enumerate() {
                if child.is_some() && leads(*addr) {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no control leader");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn meta_url(&self) -> String {
        if self.metas.is_empty() {
            format!("http://{}", self.meta_addr)
        } else {
            self.metas
                .iter()
                .map(|(a, _)| format!("http://{a}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    }

    pub fn meta_client(&self) -> MetaClient {
        MetaClient::new(&self.meta_url(), TOKEN)
    }

    pub fn route(&self) -> RouteTable {
        self.meta_client().route().expect("route table")
    }

    /// Describes node `nodes.len()` (ports, proxies, disk, log) without
    /// starting it; returns its index.
    fn push_node(&mut self, disks_in_one_dir: bool) -> usize {
        let i = self.nodes.len();
        let listen = free_port();
        let n = NodeProc {
            index: i,
            disk: if disks_in_one_dir {
                self.dir.path().join(format!("disks/node{i}.img"))
            } else {
                self.dir.path().join(format!("node{i}/disk.img"))
            },
            listen,
            admin: free_port(),
            data_proxy: FaultProxy::start(listen),
            meta_proxy: FaultProxy::start(self.meta_addr),
            child: None,
            log: self.dir.path().join(format!("node{i}.log")),
        };
        self.nodes.push(n);
        i
    }

    /// Starts one more node (a new disk of the cluster's size), as an
    /// operator adds a host; returns its index. The control service moves
    /// partitions to it once it registers.
    pub fn add_node(&mut self) -> usize {
        let i = self.push_node(false);
        self.spawn_node(i, self.disk_bytes);
        i
    }

    fn spawn_node(&mut self, i: usize, disk_bytes: u64) {
        self.spawn_node_with(i, disk_bytes, &[]);
    }

    /// Starts node `i`'s process with `extra` flags after the usual ones.
    pub fn spawn_node_with(&mut self, i: usize, disk_bytes: u64, extra: &[String]) {
        let node_meta = if self.metas.is_empty() {
            format!("http://{}", self.nodes[i].meta_proxy.addr())
        } else {
            self.meta_url()
        };
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("node log");
        let child = Command::new(&self.bin)
            .args(["node", "serve", "--disk"])
            .arg(&n.disk)
            .args(["--create", &disk_bytes.to_string()])
            .args(["--listen", &n.listen.to_string()])
            .args(["--advertise", &n.data_proxy.addr().to_string()])
            .args(["--admin-listen", &n.admin.to_string()])
            .args(["--meta", &node_meta])
            .args(["--token", TOKEN])
            .args(["--domain", &format!("host{i}")])
            .args(
                self.tls_creds
                    .iter()
                    .flat_map(|d| [std::ffi::OsStr::new("--tls-creds"), d.as_os_str()]),
            )
            .args(extra)
            .env("CELER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn node");
        n.child = Some(child);
    }

    /// Node `i`'s id, from its admin server's `/v1/status`; waits up to
    /// 30 s for the node to answer (a node just started).
    pub fn node_id(&self, i: usize) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(id) = self.try_node_id(i) {
                return id;
            }
            assert!(
                Instant::now() < deadline,
                "node {i}'s admin server does not answer"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_node_id(&self, i: usize) -> Option<u32> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.nodes[i].admin).ok()?;
        s.write_all(b"GET /v1/status HTTP/1.0\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let body = text.split("\r\n\r\n").nth(1)?;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v["node_id"].as_u64().map(|id| id as u32)
    }

    /// Waits until the control service marks `id` down (its lease expired).
    pub fn wait_down(&self, id: u32, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(t) = self.meta_client().route() {
                if t.node(id).is_some_and(|n| !n.up) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} not marked down after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one more `celer node serve` (disk `name`.img in the cluster's
    /// directory, created if need be, fresh ports, its own state directory)
    /// with `extra` flags, straight to the control service. Returns its
    /// exit code if it exited within `within` (else it is killed: `None`),
    /// and its log.
    pub fn run_node_once(
        &self,
        name: &str,
        extra: &[String],
        within: Duration,
    ) -> (Option<i32>, String) {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("node.log");
        let mut child = Command::new(&self.bin)
            .args(["node", "serve", "--disk"])
            .arg(dir.join("disk.img"))
            .args(["--create", &self.disk_bytes.to_string()])
            .args(["--listen", &free_port().to_string()])
            .args(["--admin-listen", &free_port().to_string()])
            .args(["--meta", &self.meta_url()])
            .args(["--token", TOKEN])
            .args(["--domain", name])
            .args(extra)
            .env("CELER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn node");
        let deadline = Instant::now() + within;
        let code = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (code, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// Seeds for clients: every node's advertised data address.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.data_proxy.addr().to_string())
            .collect()
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn_node(i, self.disk_bytes);
    }

    /// Replaces node `i`'s disk with a new, empty one, as an operator
    /// does: the node stops, its lease expires, it is started on the new
    /// disk with `--replace-disk ID` (the control service refuses another
    /// disk for a node while its lease runs, or without the flag).
    pub fn swap_disk(&mut self, i: usize) {
        let id = self.node_id(i);
        self.kill(i);
        std::fs::remove_file(&self.nodes[i].disk).expect("remove the old disk");
        self.wait_down(id, Duration::from_secs(10));
        self.spawn_node_with(
            i,
            self.disk_bytes,
            &["--replace-disk".into(), id.to_string()],
        );
    }

    /// Cuts node `i` off from everyone (clients, peers, control service).
    pub fn partition(&self, i: usize, on: bool) {
        self.nodes[i].data_proxy.partition(on);
        self.nodes[i].meta_proxy.partition(on);
    }

    /// Cuts node `i` off with nftables: packets to or from its data port
    /// (behind the proxy) and its control-service link are dropped in the
    /// kernel, so TCP retransmits as in a real partition. Needs root.
    pub fn partition_nft(&self, i: usize, on: bool) {
        let table = format!("celer_test_{}_{}", std::process::id(), i);
        let n = &self.nodes[i];
        let ports = format!("{{ {}, {} }}", n.listen.port(), n.meta_proxy.addr().port());
        let run = |args: &[&str]| {
            let out = Command::new("nft")
                .args(args)
                .output()
                .expect("run nft (needs root and the nftables package)");
            assert!(
                out.status.success(),
                "nft {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if on {
            run(&["add", "table", "inet", &table]);
            run(&[
                "add",
                "chain",
                "inet",
                &table,
                "in",
                "{ type filter hook input priority 0; }",
            ]);
            run(&[
                "add", "rule", "inet", &table, "in", "tcp", "dport", &ports, "drop",
            ]);
            run(&[
                "add", "rule", "inet", &table, "in", "tcp", "sport", &ports, "drop",
            ]);
        } else {
            run(&["delete", "table", "inet", &table]);
        }
    }

    /// Waits until every partition has all its members in sync and no
    /// node is down, or panics after `limit`.
    pub fn wait_healthy(&self, limit: Duration) -> RouteTable {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(t) = self.meta_client().route() {
                let all_up = t.nodes.iter().all(|n| n.up);
                let synced = t
                    .partitions
                    .iter()
                    .all(|p| p.all_in_sync() && p.members.len() == t.replicas as usize);
                if all_up && synced {
                    return t;
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster not healthy after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Keeps the logs when a test fails.
    pub fn keep_logs(self) -> PathBuf {
        let mut c = self;
        for i in 0..c.nodes.len() {
            c.kill(i);
        }
        if let Some(mut m) = c.meta.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
        let d = std::mem::replace(&mut c.dir, tempfile::tempdir().expect("tempdir"));
        d.keep()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for (_, c) in &mut self.metas {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for c in &mut self.etcds {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // A failed test keeps its logs.
            if let Ok(empty) = tempfile::tempdir() {
                let d = std::mem::replace(&mut self.dir, empty);
                eprintln!("cluster logs kept in {}", d.keep().display());
            }
        }
        if let Some(mut m) = self.meta.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}
