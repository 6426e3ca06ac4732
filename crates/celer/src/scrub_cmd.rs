//! `celer scrub status|start|pause|resume`: the storage nodes' background
//! scrub, through each node's admin API (`/v1/scrub`). Nodes are those the
//! control service lists as up, or the admin addresses given with `--node`.
//! `start`, `pause` and `resume` present an admin ticket the control
//! service issues to operator tokens (`POST /v1/admin-ticket`).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::meta_cmd::Conn;

#[derive(Subcommand)]
pub enum ScrubCommand {
    /// Each node's scrub: passes done, the pass under way, blocks found
    /// damaged (repaired from another member, or reported unrepairable).
    Status(ScrubArgs),
    /// Start a pass now on every shard not already in one (and resume).
    Start(ScrubArgs),
    /// Pause scrubbing (a pass under way stops where it is).
    Pause(ScrubArgs),
    /// Resume a paused scrub.
    Resume(ScrubArgs),
}

#[derive(Args)]
pub struct ScrubArgs {
    /// A node's admin address (host:port); repeat for several. Default:
    /// every node the control service lists as up.
    #[arg(long = "node", value_name = "ADMIN_ADDR")]
    nodes: Vec<String>,
    /// With `start`: scrub only this volume's data (all its layers:
    /// snapshots too).
    #[arg(long)]
    volume: Option<String>,
    /// Print JSON (one object per node).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

pub fn run(cmd: ScrubCommand) -> Result<()> {
    let (action, a) = match cmd {
        ScrubCommand::Status(a) => (None, a),
        ScrubCommand::Start(a) => (Some("start"), a),
        ScrubCommand::Pause(a) => (Some("pause"), a),
        ScrubCommand::Resume(a) => (Some("resume"), a),
    };
    let nodes = if a.nodes.is_empty() {
        let route = a
            .conn
            .client()?
            .route()
            .map_err(|e| anyhow::anyhow!("route table from the control service: {e}"))?;
        route
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| n.admin_addr.clone())
            .collect()
    } else {
        a.nodes.clone()
    };
    anyhow::ensure!(!nodes.is_empty(), "no storage node is up");
    // One volume: the layer keys its data lives under.
    let only = match (&a.volume, action) {
        (None, _) => None,
        (Some(name), Some("start")) => {
            let v = a
                .conn
                .client()?
                .volume(name)
                .map_err(crate::meta_cmd::human)?;
            let lineage = v.lineage();
            let keys: Vec<u64> = v
                .eras()
                .into_iter()
                .map(|e| celer_device::layer_key(lineage, e))
                .collect();
            Some(serde_json::json!({ "keys": keys }).to_string())
        }
        (Some(_), _) => anyhow::bail!("--volume goes with `celer scrub start` only"),
    };
    // The nodes' controls take an admin ticket from the control service
    // (operator tokens only), not the node credential.
    let auth = match action {
        None => String::new(),
        Some(_) => {
            let t = a.conn.client()?.admin_ticket().map_err(|e| {
                anyhow::anyhow!(
                    "an admin ticket from the control service (an operator token is needed): {e}"
                )
            })?;
            format!("Celer-Ticket {}", t.ticket)
        }
    };
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let mut failed = 0;
    for addr in &nodes {
        let r = match action {
            None => agent.get(&format!("http://{addr}/v1/scrub")).call(),
            Some(act) => agent
                .post(&format!("http://{addr}/v1/scrub/{act}"))
                .set("authorization", &auth)
                .send_string(only.as_deref().unwrap_or("")),
        };
        let v: serde_json::Value = match r {
            Ok(resp) => resp
                .into_json()
                .with_context(|| format!("node {addr}: scrub status"))?,
            Err(ureq::Error::Status(code, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                eprintln!("node {addr}: HTTP {code}: {body}");
                failed += 1;
                continue;
            }
            Err(e) => {
                eprintln!("node {addr}: {e}");
                failed += 1;
                continue;
            }
        };
        if a.json {
            println!("{v}");
        } else {
            print_status(addr, &v);
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} nodes did not answer",
        nodes.len()
    );
    Ok(())
}

fn print_status(addr: &str, v: &serde_json::Value) {
    let u = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let state = if v["paused"].as_bool() == Some(true) {
        "paused"
    } else if v["running"].as_bool() == Some(true) {
        "running"
    } else {
        "idle"
    };
    println!(
        "node {} ({addr}): {state}, {} passes, {} checked, {} damaged blocks found; copies differing from other members: {} behind, {} mismatched (copied), {} divergent (no majority)",
        u(v, "node_id"),
        u(v, "passes"),
        human_bytes(u(v, "bytes")),
        u(v, "damaged_blocks"),
        u(v, "behind_blocks"),
        u(v, "mismatched_blocks"),
        u(v, "divergent_blocks"),
    );
    for s in v["shards"].as_array().into_iter().flatten() {
        if s["running"].as_bool() == Some(true) {
            println!(
                "  shard {}: pass at chunk {}/{}, {} checked",
                u(s, "shard"),
                u(s, "chunks_done"),
                u(s, "chunks_total"),
                human_bytes(u(s, "pass_bytes"))
            );
        } else if u(s, "passes") > 0 {
            println!(
                "  shard {}: last pass {} in {:.1} s",
                u(s, "shard"),
                human_bytes(u(s, "last_pass_bytes")),
                u(s, "last_pass_ms") as f64 / 1000.0
            );
        }
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < UNITS.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[i])
    }
}
