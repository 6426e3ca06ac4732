//! `celer up`: a whole cluster on this machine in one process, for trying
//! Celer and for development: the control service (embedded redb), three
//! storage nodes on loopback over data files under `--dir`, a volume, and
//! that volume on a vhost-user-blk socket and over NBD. Ctrl-C stops it
//! cleanly (engines checkpoint); a second `celer up` reuses the data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use celer_meta::api::CreateVolume;
use celer_meta::client::MetaClient;
use clap::Args;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory for the cluster's data (node disks, metadata, sockets).
    #[arg(long, default_value = "celer-up")]
    pub dir: PathBuf,
    /// Size of the volume `celer up` creates.
    #[arg(long, default_value = "10G", value_parser = celer_device::parse_size)]
    pub size: u64,
    /// Name of the volume.
    #[arg(long, default_value = "default")]
    pub volume: String,
    /// Storage nodes (3 replicas need at least 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub nodes: u16,
    /// First port: control service on it, the volume's metrics on +1, nodes'
    /// data ports from +101, their admin ports (and /metrics) from +201
    /// (defaults 7700, 7701, 7801.., 7901..).
    #[arg(long, default_value_t = 7700)]
    pub base_port: u16,
    /// NBD over TCP.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// Serve NBD over TCP with TLS, credentials in this directory in
    /// qemu's tls-creds-x509 layout (ca-cert.pem, server-cert.pem,
    /// server-key.pem); clients need a certificate from that CA. The Unix
    /// socket stays plain (its directory guards it).
    #[arg(long, value_name = "DIR")]
    pub nbd_tls_creds: Option<PathBuf>,
    /// With --nbd-tls-creds: only these client certificate subjects, one
    /// per line (e.g. CN=host1,O=Example); read for every connection.
    #[arg(long, value_name = "FILE", requires = "nbd_tls_creds")]
    pub nbd_tls_allowed_clients: Option<PathBuf>,
    /// Data TLS between the volume's client and the nodes, and between
    /// nodes: DIR holds ca-cert.pem, server-cert.pem/server-key.pem (naming
    /// IP 127.0.0.1) and client-cert.pem/client-key.pem (see
    /// docs/security.md, "Data TLS"). Every node and the client use it.
    #[arg(long, value_name = "DIR")]
    pub data_tls_creds: Option<PathBuf>,
    /// Virtqueues of the vhost-user-blk export.
    #[arg(long, default_value_t = 2)]
    pub queues: usize,
}

fn token(dir: &Path) -> Result<String> {
    let path = dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        anyhow::ensure!(
            !t.is_empty(),
            "{} is empty: remove it to get a new token",
            path.display()
        );
        return Ok(t);
    }
    let mut b = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("open /dev/urandom")?,
        &mut b,
    )
    .context("read /dev/urandom")?;
    let t: String = b.iter().map(|x| format!("{x:02x}")).collect();
    write_private_file(&path, &format!("{t}\n"))?;
    Ok(t)
}

/// Writes `contents` to `path`, readable by its owner only, atomically: a
/// new temporary file beside it is created with mode 0600 (never readable
/// by others, not even for a moment), written, synced, and renamed over
/// `path`, so a reader sees the whole file or none.
fn write_private_file(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        // create_new: never reuse (or follow a link at) an existing path.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("write {}", path.display()))
}

pub fn run(a: &UpArgs) -> Result<()> {
    anyhow::ensure!(
        a.base_port <= 65535 - 300,
        "--base-port {} is too high",
        a.base_port
    );
    anyhow::ensure!(
        a.size >= 1 << 20 && a.size.is_multiple_of(4096),
        "--size must be at least 1M and a multiple of 4K"
    );
    std::fs::create_dir_all(&a.dir).with_context(|| format!("create {}", a.dir.display()))?;
    let dir = a.dir.canonicalize().context("resolve --dir")?;
    let token = token(&dir)?;
    let meta_addr: SocketAddr = ([127, 0, 0, 1], a.base_port).into();
    let mut cfg = celer_meta::server::MetaConfig::new(meta_addr, dir.join("meta"), &token);
    cfg.cluster.replicas = a.nodes.min(3) as u8;
    let meta = celer_meta::server::MetaServer::start(cfg)
        .with_context(|| format!("start the control service on {meta_addr}"))?;
    let meta_url = meta.url();
    // Every node holds a copy of everything with 3 nodes: room for the
    // volume plus the engine's spare blocks and journals (sparse files).
    let disk_bytes = a.size + a.size / 3 + (512 << 20);
    let mut nodes = Vec::new();
    for i in 0..a.nodes {
        let node_dir = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let disk = node_dir.join("disk.img");
        if celer_engine::Engine::identify(&disk).is_err() {
            anyhow::ensure!(
                !std::fs::metadata(&disk).is_ok_and(|m| m.len() > 0),
                "{} exists and is not a Celer disk: refusing to touch it",
                disk.display()
            );
            celer_engine::Engine::format(
                &disk,
                &celer_engine::FormatOptions {
                    shard_count: 2,
                    create_size_bytes: Some(disk_bytes),
                    ..Default::default()
                },
            )
            .with_context(|| format!("format {}", disk.display()))?;
        }
        let node = celer_node::Node::start(celer_node::NodeConfig {
            disk,
            state_dir: node_dir,
            listen: ([127, 0, 0, 1], a.base_port + 101 + i).into(),
            advertise: None,
            admin_listen: ([127, 0, 0, 1], a.base_port + 201 + i).into(),
            meta_url: Some(meta_url.clone()),
            token: token.clone(),
            node_id: None,
            domain: format!("node{i}"),
            route_file: None,
            forward_timeout: Duration::from_millis(500),
            busy_poll: Duration::ZERO,
            insecure_no_auth: false,
            idle_timeout: Some(celer_node::IDLE_TIMEOUT_DEFAULT),
            scrub_bytes_per_sec: celer_node::SCRUB_RATE_DEFAULT,
            scrub_interval: celer_node::SCRUB_INTERVAL_DEFAULT,
            tls_creds: a.data_tls_creds.clone(),
            hugepages: false,
        })
        .with_context(|| format!("start storage node {i}"))?;
        nodes.push(node);
    }
    let mc = MetaClient::new(&meta_url, &token);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match mc.route() {
            Ok(t) if t.nodes.iter().filter(|n| n.up).count() == nodes.len() => break,
            _ if Instant::now() > deadline => {
                anyhow::bail!("the storage nodes did not join the cluster within 30 s")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let vol = match mc.volume(&a.volume) {
        Ok(v) => {
            if v.size_bytes != a.size {
                eprintln!(
                    "note: volume `{}` exists with {} bytes; --size {} ignored (grow it with `celer volume resize`)",
                    v.name, v.size_bytes, a.size
                );
            }
            v
        }
        Err(e) if e.is_not_found() => mc
            .create_volume(&CreateVolume {
                name: a.volume.clone(),
                size_bytes: a.size,
                replicas: None,
                sector_size_bytes: None,
            })
            .context("create the volume")?,
        Err(e) => return Err(e).context("look up the volume"),
    };
    // The attachment is kept in the cluster directory: `celer up` run
    // again on it resumes it instead of being refused as a second writer.
    let (client, _attached) = crate::cluster_dev::open_client(
        &meta_url,
        &token,
        &a.volume,
        &crate::cluster_dev::AttachOptions {
            state_file: Some(dir.join("attachment.json")),
            data_tls: a.data_tls_creds.clone(),
            ..crate::cluster_dev::AttachOptions::exclusive("celer up")
        },
    )?;
    let metrics = crate::device_metrics::DeviceMetrics::new();
    let metrics_addr = {
        let client = client.clone();
        metrics.serve(([127, 0, 0, 1], a.base_port + 1).into(), move |m| {
            m.set_route_epoch(client.route_table().epoch)
        })?
    };
    let dev = crate::device_metrics::MeteredDevice::wrap(client.clone(), metrics);
    let vhost_socket = dir.join("vhost.sock");
    let nbd_socket = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&vhost_socket);
    let _ = std::fs::remove_file(&nbd_socket);
    {
        let dev = dev.clone();
        let args = celer_vhost::cli::ServeArgs {
            config: None,
            metrics_listen: None,
            socket: vhost_socket.clone(),
            device: "cluster".into(),
            queues: a.queues,
            cpus: Vec::new(),
            poll_us: None,
            poll_inflight_us: 0,
            read_only: false,
            direct: true,
            connections: None,
            data_tls_creds: None,
        };
        // `celer volume resize` reaches the guest (and new NBD connections).
        let follow = Some((
            client.clone(),
            crate::cluster_dev::SizeWatch::new(&meta_url, &token, &a.volume),
        ));
        std::thread::Builder::new()
            .name("celer-up-vhost".into())
            .spawn(move || {
                if let Err(e) = crate::cluster_dev::serve_vhost(&args, dev, follow) {
                    tracing::error!("vhost-user-blk export stopped: {e:#}");
                }
            })?;
    }
    {
        let dev: Arc<dyn celer_device::BlockDevice> = dev.clone();
        let args = celer_nbd::cli::ServeArgs {
            config: None,
            metrics_listen: None,
            listen: Some(a.nbd_listen),
            socket: Some(nbd_socket.clone()),
            device: "cluster".into(),
            export_name: a.volume.clone(),
            read_only: false,
            connections: None,
            data_tls_creds: None,
            limits: Default::default(),
            tls: celer_nbd::cli::TlsArgs {
                tls_creds: a.nbd_tls_creds.clone(),
                tls_no_verify_peer: false,
                tls_allowed_clients: a.nbd_tls_allowed_clients.clone(),
                tls_allow_plain_unix: true,
            },
        };
        // Bad credentials stop `celer up` here, not in the NBD thread.
        if let Some(tls) = args.tls.config() {
            celer_nbd::check_tls(&tls).context("--nbd-tls-creds")?;
        }
        std::thread::Builder::new()
            .name("celer-up-nbd".into())
            .spawn(move || {
                if let Err(e) = celer_nbd::cli::run_serve_with(&args, dev) {
                    tracing::error!("NBD export stopped: {e:#}");
                }
            })?;
    }
    // Wait for the sockets to exist before telling anyone to use them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(vhost_socket.exists() && nbd_socket.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    print_attach(
        a,
        &vol.name,
        vol.size_bytes,
        &meta_url,
        &dir,
        &vhost_socket,
        &nbd_socket,
    );
    println!(
        "Metrics: http://{metrics_addr}/metrics (volume), {meta_url}/metrics (control service), http://127.0.0.1:{}/metrics … (nodes)",
        a.base_port + 201
    );
    println!("Press Ctrl-C to stop.");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    crate::on_termination(move || {
        let _ = tx.send(());
    });
    let _ = rx.recv();
    eprintln!("stopping: storage nodes checkpoint their engines…");
    // The control service first: it must not see the nodes' leases expire
    // one after another and reroute (the next start would then re-copy
    // every partition from the last node to go).
    if let Err(e) = meta.stop() {
        eprintln!("the control service stopped with an error: {e}");
    }
    for n in nodes {
        if let Err(e) = n.stop() {
            eprintln!("a storage node stopped with an error: {e}");
        }
    }
    eprintln!(
        "stopped; the data stays in {} for the next `celer up`",
        dir.display()
    );
    Ok(())
}

fn print_attach(
    a: &UpArgs,
    name: &str,
    size: u64,
    meta_url: &str,
    dir: &Path,
    vhost: &Path,
    nbd: &Path,
) {
    let gib = size as f64 / (1u64 << 30) as f64;
    println!(
        "Celer is up: {} storage nodes, volume `{name}` ({gib:.1} GiB, 3 replicas)",
        a.nodes
    );
    println!();
    println!(
        "  control service  {meta_url}   (token in {}/token)",
        dir.display()
    );
    println!("  vhost-user-blk   {}", vhost.display());
    match &a.nbd_tls_creds {
        None => println!("  NBD              nbd://{}/{name}", a.nbd_listen),
        Some(creds) => {
            println!(
                "  NBD (TLS)        {} (credentials {}; clients need a certificate from its CA)",
                a.nbd_listen,
                creds.display()
            );
        }
    }
    println!(
        "                   nbd+unix:///{name}?socket={}",
        nbd.display()
    );
    println!();
    println!("Attach it to a VM (guest memory must be shared with Celer):");
    println!();
    println!(
        "  qemu-system-x86_64 -machine q35,accel=kvm -m 4G \\\n    -object memory-backend-memfd,id=mem,size=4G,share=on -numa node,memdev=mem \\\n    -chardev socket,id=celer0,path={} \\\n    -device vhost-user-blk-pci,chardev=celer0,num-queues={} \\\n    ... (your boot disk, network)",
        vhost.display(),
        a.queues
    );
    println!();
    println!("libvirt domain XML:");
    println!();
    for l in crate::libvirt::MEMORY_BACKING.lines() {
        println!("  {l}");
    }
    print!("{}", crate::libvirt::disk_xml(vhost, a.queues, "vdb", "  "));
    println!(
        "  (a whole domain: celer vhost libvirt-xml --socket {} --queues {} --domain NAME)",
        vhost.display(),
        a.queues
    );
    println!();
    println!(
        "Or over NBD: qemu-img info 'nbd+unix:///{name}?socket={}'",
        nbd.display()
    );
    if a.nbd_tls_creds.is_some() {
        println!(
            "Over NBD with TLS (CLIENT_DIR: ca-cert.pem, client-cert.pem, client-key.pem):\n  qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir=CLIENT_DIR \\\n    --image-opts driver=nbd,server.type=inet,server.host={},server.port={},export={name},tls-creds=tls0",
            a.nbd_listen.ip(),
            a.nbd_listen.port()
        );
    }
    println!(
        "Cluster health: celer status --meta {meta_url} --token-file {}/token",
        dir.display()
    );
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_token_file_is_private_from_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = super::token(dir.path()).expect("a new token");
        let path = dir.path().join("token");
        let mode = std::fs::metadata(&path)
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{t}\n")
        );
        assert_eq!(super::token(dir.path()).expect("the same token"), t);
        // Rewriting replaces the contents, still 0600, and leaves no
        // temporary file behind.
        super::write_private_file(&path, "other\n").expect("rewrite");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "other\n");
        let mode = std::fs::metadata(&path)
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("token")]);
    }
}
