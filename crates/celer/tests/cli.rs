//! The `celer` command line: happy paths and bad arguments (exit code and
//! a message that says what to do).

use std::process::{Command, Output};

fn celer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_celer"))
        .args(args)
        .output()
        .expect("run celer")
}

/// Runs celer and asserts it succeeded; returns its stdout.
fn succeeds(args: &[&str]) -> String {
    let out = celer(args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(args: &[&str], needle: &str) {
    let out = celer(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        err.contains(needle),
        "{args:?}: stderr lacks {needle:?}:\n{err}"
    );
}

#[test]
fn engine_commands_and_their_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("d.img");
    let d = disk.to_str().expect("utf-8 path");

    let out = succeeds(&[
        "engine",
        "format",
        "--disk",
        d,
        "--size",
        "64M",
        "--journal-size",
        "1M",
    ]);
    assert!(out.contains("formatted"));
    // A second format must not silently destroy the engine.
    fails_with(
        &["engine", "format", "--disk", d],
        "already holds a Celer engine",
    );
    succeeds(&[
        "engine",
        "format",
        "--disk",
        d,
        "--force",
        "--journal-size",
        "1M",
    ]);

    assert!(succeeds(&["engine", "info", "--disk", d]).contains("chunks allocated"));
    assert!(succeeds(&["engine", "check", "--disk", d]).contains("0 bad"));
    let out = succeeds(&[
        "engine", "locate", "--disk", d, "--volume", "1", "--offset", "1M",
    ]);
    assert!(out.contains("holds no data"));
    succeeds(&["engine", "rebuild", "--disk", d]);

    // Bad arguments.
    fails_with(
        &["engine", "format", "--disk", d, "--size", "ten"],
        "not a size",
    );
    fails_with(
        &[
            "engine",
            "format",
            "--disk",
            d,
            "--force",
            "--chunk-size",
            "100K",
        ],
        "power of two",
    );
    fails_with(
        &["engine", "format", "--disk", d, "--force", "--shards", "0"],
        "shard_count",
    );
    fails_with(&["engine", "info"], "--disk");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 1 << 20]).expect("write");
    let j = junk.to_str().expect("utf-8");
    fails_with(&["engine", "info", "--disk", j], "not a Celer engine disk");
    fails_with(&["engine", "format", "--disk", j], "holds data");
    fails_with(
        &["engine", "info", "--disk", "/nonexistent/celer.img"],
        "/nonexistent/celer.img",
    );
    fails_with(&["engine", "frobnicate"], "unrecognized subcommand");
}

#[test]
fn serve_commands_reject_bad_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().expect("utf-8");
    fails_with(
        &[
            "nbd",
            "serve",
            "--socket",
            s,
            "--device",
            "null:1M",
            "--tls-creds",
            "/nonexistent/creds",
        ],
        "cannot read /nonexistent/creds/server-cert.pem",
    );
    fails_with(
        &["vhost", "serve", "--socket", s, "--device", "engine:"],
        "needs a path",
    );
    fails_with(
        &[
            "vhost",
            "serve",
            "--socket",
            s,
            "--device",
            "engine:/x,volume=1",
        ],
        "size=SIZE",
    );
    fails_with(
        &[
            "vhost",
            "serve",
            "--socket",
            s,
            "--device",
            "engine:/x,size=1G,colour=red",
        ],
        "unknown engine device option",
    );
    fails_with(
        &[
            "vhost",
            "serve",
            "--socket",
            s,
            "--device",
            "engine:/nonexistent/e.img,size=1G",
        ],
        "/nonexistent/e.img",
    );
    fails_with(
        &[
            "nbd",
            "serve",
            "--socket",
            s,
            "--device",
            "engine:/x,volume=one,size=1G",
        ],
        "volume=one",
    );
    fails_with(&["bench", "engine", "--volume-size", "3K"], "--volume-size");
    // The delay device (a test tool): its own errors, and its inner
    // device's.
    for (device, needle) in [
        ("delay:", "delay:MICROS:DEVICE"),
        ("delay:100", "delay:MICROS:DEVICE"),
        ("delay:ten:null:1M", "not a number of microseconds"),
        ("delay:-5:null:1M", "not a number of microseconds"),
        (
            "delay:18446744073709551615:null:1M",
            "at most 10000000 microseconds",
        ),
        ("delay:100:", "device must be null:SIZE"),
        ("delay:100:null:nope", "nope"),
        (
            "delay:100:file:/nonexistent/disk.img",
            "/nonexistent/disk.img",
        ),
    ] {
        fails_with(
            &["vhost", "serve", "--socket", s, "--device", device],
            needle,
        );
    }
}

#[test]
fn node_up_and_daemon_settings_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let disk = d.join("disk.img");
    let disk = disk.to_str().expect("utf8");
    // Node: token, identity and disk problems are named.
    fails_with(
        &["node", "serve", "--disk", disk],
        "cluster token is required",
    );
    fails_with(
        &["node", "serve", "--disk", disk, "--token", "t"],
        "give --meta URL",
    );
    fails_with(
        &[
            "node",
            "serve",
            "--disk",
            disk,
            "--token",
            "t",
            "--node-id",
            "1",
        ],
        "does not exist: give --create SIZE",
    );
    std::fs::write(d.join("junk"), b"precious data").expect("write");
    let junk = d.join("junk");
    let junk = junk.to_str().expect("utf8");
    fails_with(
        &[
            "node",
            "serve",
            "--disk",
            junk,
            "--create",
            "1G",
            "--token",
            "t",
            "--node-id",
            "1",
        ],
        "refusing to format",
    );
    fails_with(
        &[
            "node",
            "serve",
            "--disk",
            disk,
            "--create",
            "1G",
            "--shards",
            "3",
            "--token",
            "t",
            "--node-id",
            "1",
        ],
        "power of two",
    );
    fails_with(
        &[
            "node", "serve", "--disk", disk, "--listen", "nowhere", "--token", "t",
        ],
        "invalid value 'nowhere'",
    );
    // The idle timeout must leave room for the clients' keep-alive (60 s);
    // refused before any disk is made.
    fails_with(
        &[
            "node",
            "serve",
            "--disk",
            disk,
            "--create",
            "1G",
            "--token",
            "t",
            "--node-id",
            "1",
            "--idle-timeout-s",
            "30",
        ],
        "--idle-timeout-s 30: give 0 (never) or at least 180",
    );
    assert!(!d.join("disk.img").exists(), "no disk made");
    let empty = d.join("empty-token");
    std::fs::write(&empty, "\n# nothing\n").expect("write");
    fails_with(
        &[
            "node",
            "serve",
            "--disk",
            disk,
            "--token-file",
            empty.to_str().expect("utf8"),
            "--node-id",
            "1",
        ],
        "is empty",
    );
    // Settings files: unknown keys, wrong types, bad TOML.
    let cfg = d.join("node.toml");
    let cfg_s = cfg.to_str().expect("utf8");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:1\"\n").expect("write");
    fails_with(
        &["node", "serve", "--config", cfg_s],
        "unknown setting `lisen`",
    );
    std::fs::write(&cfg, "read_only = 7\n").expect("write");
    fails_with(&["nbd", "serve", "--config", cfg_s], "is a switch");
    std::fs::write(&cfg, "queues = [\n").expect("write");
    fails_with(&["vhost", "serve", "--config", cfg_s], "not valid TOML");
    fails_with(
        &["vhost", "serve", "--config", "/nonexistent/x.toml"],
        "read the settings file",
    );
    // celer up: sizes and ports.
    fails_with(
        &["up", "--dir", d.to_str().expect("utf8"), "--size", "3K"],
        "--size",
    );
    fails_with(&["up", "--nodes", "0"], "--nodes");
    fails_with(&["up", "--base-port", "65400"], "too high");
    // cluster: devices.
    fails_with(
        &[
            "nbd",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cluster:",
        ],
        "needs a volume name",
    );
    fails_with(
        &[
            "nbd",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cluster:v,color=red",
        ],
        "unknown cluster device option",
    );
}

/// The libvirt XML `celer vhost libvirt-xml` prints (the same disk element
/// as `celer up` shows) is valid for libvirt's domain schema, with a socket
/// path that needs escaping too; a broken one is refused by the validator.
#[test]
fn libvirt_domain_xml_validates_against_the_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let validate = |xml: &str| -> (bool, String) {
        let f = dir.path().join("domain.xml");
        std::fs::write(&f, xml).expect("write");
        let o = Command::new("virt-xml-validate")
            .arg(&f)
            .arg("domain")
            .output()
            .expect(
                "virt-xml-validate (apt libvirt-clients libxml2-utils; scripts/install-deps.sh)",
            );
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    for socket in ["/run/celer/vm1.sock", "/tmp/it's <odd> & long.sock"] {
        let xml = succeeds(&[
            "vhost",
            "libvirt-xml",
            "--socket",
            socket,
            "--queues",
            "4",
            "--domain",
            "vm-1",
        ]);
        assert!(
            xml.contains("type='vhostuser'") && xml.contains("queues='4'"),
            "{xml}"
        );
        let (ok, out) = validate(&xml);
        assert!(ok, "libvirt refuses the domain XML:\n{xml}\n{out}");
        // The disk element alone is the one inside it.
        let disk = succeeds(&["vhost", "libvirt-xml", "--socket", socket, "--queues", "4"]);
        let element = disk
            .split_once("</memoryBacking>\n")
            .map(|(_, d)| d)
            .expect("disk after memoryBacking");
        let indented: String = element.lines().map(|l| format!("    {l}\n")).collect();
        assert!(xml.contains(&indented), "{xml}\n{element}");
    }
    let xml = succeeds(&["vhost", "libvirt-xml", "--socket", "/s", "--domain", "d"]);
    let (ok, _) = validate(&xml.replace("vhostuser", "vhostuserx"));
    assert!(!ok, "the validator must refuse a wrong disk type");
    fails_with(
        &["vhost", "libvirt-xml", "--socket", "/s", "--queues", "0"],
        "--queues 0",
    );
}

/// One process per disk, from the command line: while `celer nbd serve`
/// holds an engine disk, `celer engine check`, `format` and `rebuild` of it
/// are refused with a message that says why; once it stops, check works.
#[test]
fn engine_commands_refuse_a_disk_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("d.img");
    let d = disk.to_str().expect("utf-8 path");
    succeeds(&["engine", "format", "--disk", d, "--size", "256M"]);
    let sock = dir.path().join("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_celer"))
        .args([
            "nbd",
            "serve",
            "--device",
            &format!("engine:{d},volume=1,size=64M"),
            "--socket",
        ])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn celer nbd serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let held = sock.exists();
    let results: Vec<(String, Output)> = [
        vec!["engine", "check", "--disk", d],
        vec!["engine", "rebuild", "--disk", d],
        vec!["engine", "format", "--disk", d, "--size", "256M", "--force"],
    ]
    .into_iter()
    .map(|args| (args.join(" "), celer(&args)))
    .collect();
    let _ = server.kill();
    let _ = server.wait();
    assert!(held, "the server did not start");
    for (what, out) in results {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "`celer {what}` of a disk in use succeeded"
        );
        assert!(
            err.contains("in use by another process"),
            "`celer {what}`: {err}"
        );
    }
    succeeds(&["engine", "check", "--disk", d]);
}

/// `celer sim` replays a seed exactly (the trace; the summary's last line
/// is wall-clock speed), runs several, and refuses bad arguments.
#[test]
fn sim_replays_a_seed_and_rejects_bad_arguments() {
    let trace = |seed: &str| -> Vec<String> {
        let out = succeeds(&["sim", "--seed", seed, "--seconds", "120", "--trace"]);
        let lines: Vec<String> = out.lines().map(str::to_string).collect();
        assert!(lines.len() > 50, "a short trace:\n{out}");
        assert!(out.contains(&format!("seed {seed}: ok")), "{out}");
        lines[..lines.len() - 1].to_vec()
    };
    assert_eq!(trace("6"), trace("6"), "seed 6 ran two different ways");
    assert_ne!(trace("6"), trace("7"));
    let many = succeeds(&["sim", "--seed", "10", "--count", "3", "--seconds", "60"]);
    for s in ["seed 10: ok", "seed 11: ok", "seed 12: ok"] {
        assert!(many.contains(s), "{many}");
    }
    fails_with(&["sim", "--seed", "x"], "invalid value 'x'");
    fails_with(
        &["sim", "--seed", "1", "--seconds", "0"],
        "0 is not in 1..=86400",
    );
    fails_with(&["sim"], "--seed");
}

/// `celer sim --data` replays a seed exactly: the trace (every request and
/// answer) twice the same, the summary's figures too (its wall-clock part
/// aside); bad arguments are refused.
#[test]
fn sim_data_replays_a_seed() {
    let run = |seed: &str| -> (Vec<String>, String) {
        let out = succeeds(&[
            "sim", "--data", "--seed", seed, "--millis", "200", "--trace",
        ]);
        let lines: Vec<String> = out.lines().map(str::to_string).collect();
        assert!(lines.len() > 500, "a short trace:\n{out}");
        let summary = lines.last().cloned().unwrap_or_default();
        assert!(
            summary.starts_with(&format!("data seed {seed}: ")),
            "{summary}"
        );
        assert!(
            summary.contains("blocks verified on every replica"),
            "{summary}"
        );
        // The figures after the last wall-clock one.
        let figures = summary
            .rsplit_once("/s wall), ")
            .map(|(_, f)| f.to_string())
            .unwrap_or_default();
        assert!(figures.contains("power cuts"), "{summary}");
        (lines[..lines.len() - 1].to_vec(), figures)
    };
    let (a, fa) = run("3");
    let (b, fb) = run("3");
    assert_eq!(a, b, "seed 3 ran two different ways");
    assert_eq!(fa, fb);
    assert_ne!(a, run("4").0);
    fails_with(
        &["sim", "--data", "--seed", "1", "--millis", "0"],
        "0 is not in 1..=3600000",
    );
    fails_with(
        &["sim", "--data", "--engine", "--seed", "1"],
        "cannot be used with",
    );
    for bad in ["-1", "1001", "NaN"] {
        let arg = format!("--power-cuts-per-sec={bad}");
        fails_with(
            &["sim", "--data", "--seed", "1", &arg],
            "between 0 and 1000",
        );
    }
    // Power cuts as often as the crash-heavy CI seeds: still replayed.
    let heavy = succeeds(&[
        "sim",
        "--data",
        "--seed",
        "2",
        "--millis",
        "200",
        "--power-cuts-per-sec",
        "50",
    ]);
    assert!(heavy.contains("power cuts"), "{heavy}");
}
