//! Which node this is. The id belongs to the disk: the engine superblock
//! records it (see `celer_engine::Engine::record_node_id`). A disk that
//! names no node yet (a new disk, or one formatted before disks recorded
//! their node) takes the fixed `--node-id`, else the `node.id` file of the
//! state directory (written by older releases), else the id the control
//! service assigns; whichever it is, it is then written to the disk.
//! `node.id` is no longer written: two disks in one directory shared it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use celer_engine::Engine;
use celer_route::NodeId;

use crate::{NodeConfig, NodeError};

/// How a node joins its cluster, beyond [`NodeConfig`].
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// This (new) disk replaces the lost or swapped disk of this node:
    /// register as it, with the operator's replace flag. The control
    /// service accepts it once that node's lease has expired; the node
    /// rejoins its partitions empty and copies their data back.
    pub replace_disk: Option<NodeId>,
    /// How long registration keeps retrying while the control service is
    /// unreachable or failing (5xx, no leader). A refusal (4xx) is final.
    pub register_timeout: Duration,
}

/// How long a node retries its registration by default.
pub const REGISTER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

impl Default for JoinOptions {
    fn default() -> Self {
        JoinOptions {
            replace_disk: None,
            register_timeout: REGISTER_TIMEOUT_DEFAULT,
        }
    }
}

/// The id a node claims when it starts, and why (for messages).
#[derive(Clone, Debug)]
pub(crate) struct Claim {
    pub(crate) id: Option<NodeId>,
    /// "node id 3 from ...", or why none is claimed.
    pub(crate) why: String,
    pub(crate) replace_disk: bool,
}

/// The id recorded on `disk`, as a node id.
pub(crate) fn disk_node_id(
    disk: &Path,
    recorded: Option<u64>,
) -> Result<Option<NodeId>, NodeError> {
    recorded
        .map(|id| {
            NodeId::try_from(id).map_err(|_| {
                NodeError::Config(format!(
                    "the superblock of {} names node {id}, which is not a valid node id (damaged, or written by another program)",
                    disk.display()
                ))
            })
        })
        .transpose()
}

/// The id to claim: the disk's; for a disk that names none, the replaced
/// node's, the fixed one, or the one saved in `node.id` by an older release.
pub(crate) fn claim(
    cfg: &NodeConfig,
    join: &JoinOptions,
    on_disk: Option<NodeId>,
) -> Result<Claim, NodeError> {
    let disk = cfg.disk.display();
    if let Some(replaced) = join.replace_disk {
        if cfg.meta_url.is_none() {
            return Err(NodeError::Config(
                "--replace-disk needs a control service (--meta): it is the one that takes the node out of its partitions".into(),
            ));
        }
        if let Some(owner) = on_disk.filter(|o| *o != replaced) {
            return Err(NodeError::Config(format!(
                "{disk} already belongs to node {owner}: it cannot replace node {replaced}'s disk. Use a new disk (or format this one with `celer engine format`), or start node {owner} without --replace-disk"
            )));
        }
        if let Some(fixed) = cfg.node_id.filter(|f| *f != replaced) {
            return Err(NodeError::Config(format!(
                "--node-id {fixed} and --replace-disk {replaced} name two different nodes: give only --replace-disk"
            )));
        }
        return Ok(Claim {
            id: Some(replaced),
            why: format!("node id {replaced} from --replace-disk"),
            // Once the disk names the node, it is the node's disk: nothing
            // left to replace (a flag left in a unit file is harmless).
            replace_disk: on_disk.is_none(),
        });
    }
    if let Some(owner) = on_disk {
        if let Some(fixed) = cfg.node_id.filter(|f| *f != owner) {
            return Err(NodeError::Config(format!(
                "{disk} belongs to node {owner} (its superblock says so), but --node-id {fixed} was given: a node takes its id from its disk; drop --node-id, or use another disk"
            )));
        }
        return Ok(Claim {
            id: Some(owner),
            why: format!("node id {owner} from the superblock of {disk}"),
            replace_disk: false,
        });
    }
    if let Some(fixed) = cfg.node_id {
        return Ok(Claim {
            id: Some(fixed),
            why: format!("node id {fixed} from --node-id"),
            replace_disk: false,
        });
    }
    let file = id_file(&cfg.state_dir);
    if let Some(saved) = saved_id(&file)? {
        tracing::info!(
            node = saved,
            file = %file.display(),
            "{disk} names no node yet: claiming the id saved by an older release"
        );
        return Ok(Claim {
            id: Some(saved),
            why: format!(
                "node id {saved} from {}, written by an older release",
                file.display()
            ),
            replace_disk: false,
        });
    }
    Ok(Claim {
        id: None,
        why: format!("no node id claimed: {disk} names none yet"),
        replace_disk: false,
    })
}

fn id_file(state_dir: &Path) -> PathBuf {
    state_dir.join("node.id")
}

/// The id in `node.id`; an absent file is none, an unreadable or garbled
/// one an error (guessing could take another node's id).
fn saved_id(file: &Path) -> Result<Option<NodeId>, NodeError> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(NodeError::Io {
                what: format!("read {}", file.display()),
                source,
            })
        }
    };
    text.trim().parse::<NodeId>().map(Some).map_err(|_| {
        NodeError::Config(format!(
            "{} holds `{}`, not a node id: fix or remove it",
            file.display(),
            text.trim()
        ))
    })
}

/// Writes `id` to the disk's superblock (durably) unless it is there.
pub(crate) fn record(disk: &Path, on_disk: Option<NodeId>, id: NodeId) -> Result<(), NodeError> {
    if on_disk == Some(id) {
        return Ok(());
    }
    Engine::record_node_id(disk, id as u64)?;
    tracing::info!(node = id, disk = %disk.display(), "node id recorded on the disk");
    Ok(())
}
