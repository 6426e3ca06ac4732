//! `celer up` as a child process, as a user runs it, for the tests that
//! drive a whole local cluster through its exports and the CLI.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_celer");

/// A base port whose ports used by `celer up` (+0, +1, +101..103,
/// +201..203, +299) are reserved for this test process (see celer-ports).
pub fn base_port() -> u16 {
    celer_ports::reserve_block(&[0, 1, 101, 102, 103, 201, 202, 203, 299])
        .expect("reserve a block of loopback ports")
}

/// `celer up` in `dir`, stopped with SIGINT when dropped (or by `stop`).
pub struct Up {
    child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub meta: String,
    pub token_file: PathBuf,
}

impl Up {
    /// `celer up --size SIZE` on a free port range.
    pub fn start(dir: &Path, size: &str) -> Up {
        Self::start_at(dir, base_port(), size)
    }

    /// `celer up --size SIZE --base-port PORT`; returns once it is ready.
    pub fn start_at(dir: &Path, port: u16, size: &str) -> Up {
        let mut child = Command::new(BIN)
            .args(["up", "--size", size, "--dir"])
            .arg(dir)
            .args(["--base-port", &port.to_string()])
            .args(["--nbd-listen", &format!("127.0.0.1:{}", port + 299)])
            .env("CELER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn celer up");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("celer up: {line}");
                if line.contains("Press Ctrl-C") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("celer up is ready");
        Up {
            child: Some(child),
            dir: dir.to_path_buf(),
            port,
            meta: format!("http://127.0.0.1:{port}"),
            token_file: dir.join("token"),
        }
    }

    /// Process id of `celer up`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn vhost_socket(&self) -> PathBuf {
        self.dir.join("vhost.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// `celer vhost serve` of cluster volume `volume` of this cluster on
    /// `socket`, to be spawned by the caller.
    pub fn vhost_serve(&self, volume: &str, socket: &Path) -> Command {
        let mut serve = Command::new(BIN);
        serve
            .args(["vhost", "serve", "--socket"])
            .arg(socket)
            .arg("--device")
            .arg(format!(
                "cluster:{volume},meta={},token-file={}",
                self.meta,
                self.token_file.display()
            ))
            .env("NO_COLOR", "1");
        serve
    }

    /// `celer volume ARGS --meta … --token-file …`.
    pub fn volume(&self, args: &[&str]) -> Output {
        self.cli("volume", args)
    }

    /// `celer snapshot ARGS --meta … --token-file …`; it must succeed;
    /// returns stdout.
    pub fn snapshot_ok(&self, args: &[&str]) -> String {
        let out = self.cli("snapshot", args);
        assert!(
            out.status.success(),
            "celer snapshot {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `celer GROUP ARGS --meta … --token-file …`, printed with its time.
    fn cli(&self, group: &str, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        c.arg(group).args(args);
        c.args(["--meta", &self.meta, "--token-file"])
            .arg(&self.token_file)
            .env("CELER_LOG", "warn");
        let t = Instant::now();
        let out = c.output().expect("run celer");
        println!(
            "celer {group} {} ({:.1} s): {}{}",
            args.join(" "),
            t.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Like `volume`, and it must succeed; returns stdout.
    pub fn volume_ok(&self, args: &[&str]) -> String {
        let out = self.volume(args);
        assert!(
            out.status.success(),
            "celer volume {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn volume_size(&self, name: &str) -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&self.volume_ok(&["info", name, "--json"])).expect("JSON");
        v["size_bytes"].as_u64().expect("size_bytes")
    }

    /// SIGINT; `celer up` must exit cleanly within 30 s.
    pub fn stop(mut self) {
        self.stop_child();
    }

    fn stop_child(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                if !std::thread::panicking() {
                    assert!(s.success(), "celer up exited with {s}");
                }
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                assert!(std::thread::panicking(), "celer up did not stop on SIGINT");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.stop_child();
    }
}
