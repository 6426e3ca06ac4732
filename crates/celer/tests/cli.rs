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
}
