//! The control service's HTTP/JSON API: request and reply bodies.
//!
//! Every request except `GET /metrics` carries `Authorization: Bearer
//! <token>`. Every error reply is [`ErrorBody`] (`{"error": "..."}`) with a
//! fitting HTTP status; the message says what to do.
//!
//! | method and path                    | body            | reply             |
//! |------------------------------------|-----------------|-------------------|
//! | `POST /v1/nodes/register`          | [`RegisterNode`]| [`Registered`]    |
//! | `POST /v1/nodes/{id}/heartbeat`    | [`Heartbeat`]   | [`HeartbeatReply`]|
//! | `POST /v1/nodes/{id}/synced`       | [`Synced`]      | [`SyncedReply`]   |
//! | `GET /v1/nodes`                    |                 | `Vec<`[`NodeStatus`]`>` |
//! | `GET /v1/route`                    |                 | [`RouteTable`]    |
//! | `POST /v1/route/split`             |                 | [`RouteTable`]    |
//! | `POST /v1/volumes`                 | [`CreateVolume`]| [`Volume`]        |
//! | `GET /v1/volumes`                  |                 | `Vec<`[`Volume`]`>` |
//! | `GET /v1/volumes/{name}`           |                 | [`Volume`]        |
//! | `GET /v1/volumes/{name}?size=N&wait_ms=M` | (long poll: until the size is not N, M ms at most) | [`Volume`] |
//! | `POST /v1/volumes/{name}/resize`   | [`ResizeVolume`]| [`Volume`]        |
//! | `DELETE /v1/volumes/{name}`        |                 | [`Volume`] (the deleted one) |
//! | `GET /v1/log?since=N&limit=M`      |                 | `Vec<`[`LogEntry`]`>` (seq > N) |
//! | `POST /v1/log/restore`             | [`RestoreLog`]  | [`Restored`]      |
//! | `GET /v1/status`                   |                 | [`Status`]        |
//! | `GET /metrics`                     |                 | Prometheus text   |

use celer_route::{NodeId, RouteTable};
use serde::{Deserialize, Serialize};

/// Heartbeat period a node is told at registration, unless configured.
pub const HEARTBEAT_MS_DEFAULT: u64 = 200;
/// A node whose last heartbeat is older than this is marked down.
pub const LEASE_MS_DEFAULT: u64 = 1000;
/// How long a node serves I/O after it sent the heartbeat (or
/// registration) the control service answered: three quarters of the
/// lease. The service marks the node down, and acknowledges writes without
/// it, only a whole lease after it received that heartbeat, which is later
/// than it was sent: the node has stopped serving by then, even if its
/// clock ran up to 14 % slower than the service's. A node cut off from the
/// service (or with the whole service down) therefore stops serving after
/// this long, as a Vitastor OSD that cannot renew its etcd lease stops:
/// run the control service highly available (etcd) where that matters.
pub fn node_serves_for(lease_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(lease_ms * 3 / 4)
}

/// Largest volume: 1 PiB.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 1 << 50;
/// Volume sizes are multiples of this.
pub const VOLUME_SIZE_ALIGN_BYTES: u64 = 4096;
/// Most replicas a volume may ask for.
pub const VOLUME_REPLICAS_MAX: u8 = 3;
/// Longest volume name.
pub const VOLUME_NAME_MAX_BYTES: usize = 63;
/// Most log entries one `GET /v1/log` returns.
pub const LOG_PAGE_MAX: usize = 1000;

/// `{"error": "..."}`: every error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// With 503 from a control process that does not lead: the leader's
    /// base URL (`http://host:port`), where to send the request instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// A storage node announcing itself (at start and after a restart).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterNode {
    /// The id this node saved from an earlier registration; `None` the first
    /// time (the control service assigns one).
    #[serde(default)]
    pub node_id: Option<NodeId>,
    /// `host:port` of the data (celer-proto) listener.
    pub data_addr: String,
    /// `host:port` of the admin HTTP listener (the control service pushes
    /// route tables to `PUT http://{admin_addr}/v1/route`).
    pub admin_addr: String,
    /// Engine shards (a power of two, at most the partition count).
    pub shards: u16,
    /// Failure domain (host, rack...): replicas go to distinct domains.
    pub domain: String,
    /// Identity of the node's engine disk. A registration that claims a
    /// known node's id from another disk is refused (409), unless
    /// `replace_disk` is set and that node's lease has expired: then the
    /// node holds none of its data any more, is taken out of its partitions
    /// and rejoins them as a syncing (backfilling) member. `None` (nodes of
    /// older releases): no identity checks.
    #[serde(default)]
    pub disk_uuid: Option<u64>,
    /// Set by an operator (`celer node serve --replace-disk ID`): this disk
    /// replaces the disk of node `node_id`, which was lost or swapped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace_disk: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// Save it: send it back as `RegisterNode::node_id` after a restart.
    pub node_id: NodeId,
    /// Send a heartbeat this often.
    pub heartbeat_ms: u64,
    /// Marked down after this long without a heartbeat.
    pub lease_ms: u64,
    /// Volume fence generations (volumes taken over at least once): the
    /// node installs them before it serves.
    #[serde(default)]
    pub fences: Vec<VolumeFence>,
    /// Layers of every layered volume: the node installs them before it
    /// serves.
    #[serde(default)]
    pub layers: Vec<VolumeLayers>,
}

/// A volume's fence generation as nodes hold it: mutations carrying an
/// older one are refused (see celer-proto, "Fencing").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeFence {
    pub volume: u64,
    pub fence: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Epoch of the route table the node holds (0: none).
    pub epoch: u64,
    /// Bytes the node's backfills of the rebalance under way have copied
    /// (finished ones included until it ends: the route table has no
    /// syncing member). Volatile: kept in memory, never logged.
    #[serde(default)]
    pub backfill_bytes_done: u64,
    /// Bytes those backfills copy in all (chunks listed by their sources ×
    /// chunk size); at least `backfill_bytes_done`.
    #[serde(default)]
    pub backfill_bytes_total: u64,
    /// The node's backfills whose chunk list has not come back yet (their
    /// bytes are not in `backfill_bytes_total`).
    #[serde(default)]
    pub backfill_partitions_unlisted: u64,
    /// Why the node cannot serve (an engine shard failed: a device error
    /// such as EIO or ENOSPC, a panic). The control service then treats it
    /// as it treats a dead node: no lease renewal, so it is marked down
    /// and its partitions move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// A condition the operator should act on before it fails writes (the
    /// host file system under a disk file is short of room).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Partitions this node catches up where it copies the partition whole
    /// instead (its source had no complete record of what it missed, or
    /// may have lost it): the control service clears the member's
    /// `catch_up_since`, so the node drops what it held and copies whole,
    /// after a restart too (`RouteTable::copy_whole`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy_whole: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The current epoch (0: no table yet).
    pub epoch: u64,
    /// The current table when the node's epoch is older (a missed push).
    pub table: Option<RouteTable>,
    /// Deleted volumes: the node frees their chunks and refuses their I/O.
    #[serde(default)]
    pub deleted_volumes: Vec<u64>,
    /// Volume fence generations (a node that missed a push, or was down).
    #[serde(default)]
    pub fences: Vec<VolumeFence>,
    /// Layers of every layered volume (a node that missed a push).
    #[serde(default)]
    pub layers: Vec<VolumeLayers>,
}

/// A node reporting that it finished backfilling partitions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synced {
    /// The epoch in which the node was a syncing member of `partitions`.
    pub epoch: u64,
    pub partitions: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncedReply {
    /// The epoch after the change (unchanged when nothing was marked).
    pub epoch: u64,
    /// The partitions now marked in sync for this node; the others were
    /// stale or unknown and were ignored.
    pub marked: Vec<u32>,
    /// Reported partitions the node is a syncing member of, but only since
    /// an epoch after the report's: it left and rejoined meanwhile (it may
    /// have missed writes, and the tables in between): backfill them again.
    #[serde(default)]
    pub backfill_again: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub data_addr: String,
    pub admin_addr: String,
    pub shards: u16,
    pub domain: String,
    pub up: bool,
    /// Milliseconds since the last heartbeat (`None`: none since the control
    /// service started).
    pub last_heartbeat_ms_ago: Option<u64>,
    /// The route epoch the node reported in its last heartbeat.
    pub epoch_acked: u64,
    /// The node's backfill figures from its last heartbeat (see
    /// [`Heartbeat`]); 0 when none since it registered.
    #[serde(default)]
    pub backfill_bytes_done: u64,
    #[serde(default)]
    pub backfill_bytes_total: u64,
    #[serde(default)]
    pub backfill_partitions_unlisted: u64,
    /// The failure the node reported (see [`Heartbeat::failure`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The warning of its last heartbeat (see [`Heartbeat::warning`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVolume {
    /// `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
    /// A positive multiple of 4096, at most 1 PiB.
    pub size_bytes: u64,
    /// 1..=3; the cluster's replica count when absent.
    #[serde(default)]
    pub replicas: Option<u8>,
    /// The logical sector size guests see, 512 or 4096; 512 when absent
    /// (disk images and cloud images are laid out in 512-byte sectors).
    #[serde(default)]
    pub sector_size_bytes: Option<u32>,
}

/// Logical sector size of a new volume when the request names none.
pub const SECTOR_SIZE_DEFAULT_BYTES: u32 = 512;
/// Logical sector size of volumes stored before it was a volume attribute:
/// they always showed guests 4096-byte sectors, and keep them.
pub const SECTOR_SIZE_LEGACY_BYTES: u32 = 4096;

fn sector_size_legacy() -> u32 {
    SECTOR_SIZE_LEGACY_BYTES
}

/// A logical sector size a volume may have: 512 or 4096.
pub fn validate_sector_size(bytes: u32) -> Result<(), String> {
    if matches!(bytes, 512 | 4096) {
        Ok(())
    } else {
        Err(format!(
            "sector size {bytes} bytes: must be 512 (the default, what disk images use) or 4096"
        ))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Assigned by the control service from 1 up; never reused.
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub replicas: u8,
    /// Unix time in milliseconds.
    pub created_at: u64,
    /// Logical sector size the front ends show (512 or 4096). Volumes
    /// stored without it were created with 4096 and keep it.
    #[serde(default = "sector_size_legacy")]
    pub sector_size_bytes: u32,
    /// The fence generation: raised by every exclusive attach (and the
    /// first shared one), so writers attached before can no longer write.
    #[serde(default)]
    pub fence: u32,
    /// The lineage whose layers hold the volume's data
    /// (`celer_device::layer_key`): a clone's is its parent's. 0 in records
    /// stored before snapshots: the volume's id (see [`Volume::lineage`]).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub lineage: u64,
    /// The era writes go to (0 until the first snapshot; see celer-proto,
    /// "Snapshots").
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub head_era: u32,
    /// The eras under the head, newest first: a read takes each block from
    /// the first layer that holds it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub under: Vec<u32>,
    /// Snapshots, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<Snapshot>,
    /// A clone: the snapshot it was cloned from (`VOLUME@SNAPSHOT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The snapshot being cut: nodes still apply writes naming its era
    /// until `until_unix_ms` (see [`VolumeLayers::cutting`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutting: Option<Cutting>,
    /// Eras of deleted snapshots that volumes still read through, each
    /// with the one era directly above it in every chain: a node frees a
    /// chunk of such an era once the era above holds every block it
    /// holds (see [`VolumeLayers::retired`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<[u32; 2]>,
}

/// See [`Volume::cutting`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cutting {
    pub era: u32,
    pub until_unix_ms: u64,
}

/// How long after a snapshot is taken nodes still apply writes that name
/// the era it froze (writes the writer sent before it learned of the
/// snapshot): long enough for every such write in flight, so all replicas
/// put each of them in the snapshot, or none does.
pub const SNAPSHOT_CUT_MS: u64 = 2000;

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

impl Volume {
    /// The lineage of the volume's layers.
    pub fn lineage(&self) -> u64 {
        if self.lineage == 0 {
            self.id
        } else {
            self.lineage
        }
    }
    /// The snapshot named `name`.
    pub fn snapshot(&self, name: &str) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.name == name)
    }
    /// The volume's layers as storage nodes hold them at `now_unix_ms`.
    pub fn layers_at(&self, now_unix_ms: u64) -> VolumeLayers {
        VolumeLayers {
            volume: self.id,
            lineage: self.lineage(),
            head: self.head_era,
            under: self.under.clone(),
            snapshots: self
                .snapshots
                .iter()
                .map(|s| SnapshotLayers {
                    era: s.era,
                    under: s.under.clone(),
                })
                .collect(),
            cutting: self
                .cutting
                .filter(|c| now_unix_ms < c.until_unix_ms)
                .map(|c| c.era),
            retired: self.retired.clone(),
        }
    }
    /// Every era the volume or its snapshots read.
    pub fn eras(&self) -> Vec<u32> {
        let mut e = vec![self.head_era];
        e.extend(self.under.iter().copied());
        for s in &self.snapshots {
            e.push(s.era);
            e.extend(s.under.iter().copied());
        }
        e
    }
    /// The eras this volume wrote: its head, its snapshots' (and deleted
    /// snapshots' it still reads through, `retired`), and era 0 of its
    /// lineage when it is the lineage's root. A clone reads its parent's
    /// eras too, but they are not its own: deleting the clone leaves them.
    pub fn own_eras(&self) -> Vec<u32> {
        let mut e = vec![self.head_era];
        e.extend(self.snapshots.iter().map(|s| s.era));
        e.extend(self.retired.iter().map(|r| r[0]));
        if self.lineage() == self.id {
            e.push(0);
        }
        e
    }
    /// Whether the volume has layers other than its own era 0 (nodes need
    /// its [`VolumeLayers`]).
    pub fn layered(&self) -> bool {
        self.lineage() != self.id || self.head_era != 0 || !self.snapshots.is_empty()
    }
}

/// A snapshot: the volume's content at one instant, read-only. Its data
/// is the layer frozen when it was taken (`era`) and the layers under it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub era: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub under: Vec<u32>,
    /// Unix time in milliseconds.
    pub created_at: u64,
}

/// `GET /v1/volumes/{name}/snapshot-usage`: per snapshot, the space only
/// it holds: what deleting it frees on the nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotUsage {
    pub name: String,
    pub era: u32,
    /// Chunk slots on all nodes (every replica counted), or None when two
    /// or more layers read it directly (a delete frees nothing then).
    pub alone_chunks: Option<u64>,
    /// `alone_chunks` in bytes (chunk slots of `chunk_bytes`).
    pub alone_bytes: Option<u64>,
}

/// A volume's layers as storage nodes hold them (see celer-proto,
/// "Snapshots"). Volumes without any are their own lineage at era 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLayers {
    pub volume: u64,
    pub lineage: u64,
    pub head: u32,
    #[serde(default)]
    pub under: Vec<u32>,
    #[serde(default)]
    pub snapshots: Vec<SnapshotLayers>,
    /// The era a snapshot being cut just froze: a write naming it is still
    /// applied to it (and answered `StaleSnapshot`) for [`SNAPSHOT_CUT_MS`]
    /// after the snapshot, so every replica puts it in the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutting: Option<u32>,
    /// `[era, above]`: a deleted snapshot's era and the era directly above
    /// it in every chain that reads it. A chunk of `era` whose every block
    /// `above` also holds is read by nobody: the node frees it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<[u32; 2]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLayers {
    pub era: u32,
    #[serde(default)]
    pub under: Vec<u32>,
}

/// `POST /v1/volumes/{name}/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSnapshot {
    /// Same rules as a volume name.
    pub name: String,
}

/// `POST /v1/admin-ticket`: what an operator presents to a node's admin
/// server (`Authorization: Celer-Ticket TICKET`) for its controls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTicketReply {
    pub ticket: String,
    /// Unix time in milliseconds.
    pub expires_unix_ms: u64,
}

/// `POST /v1/volumes/{name}/rollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    pub snapshot: String,
}

/// `POST /v1/volumes/{name}/clone`: a new volume `name` over snapshot
/// `snapshot` of the volume in the path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneVolume {
    pub snapshot: String,
    pub name: String,
}

/// `POST /v1/volumes/{name}/flatten`: every block the volume read from
/// the layers under its head has been copied into the head (`celer volume
/// flatten` did it on every member, see celer-proto `Fill`); the control
/// service cuts the volume off those layers. `head_era` and `under` are the
/// layers the copy was made for: refused if the volume's are others now
/// (a snapshot of it was taken meanwhile).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlattenVolume {
    pub head_era: u32,
    pub under: Vec<u32>,
}

/// How an attachment shares its volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// The only writer: a second read-write attach is refused (naming the
    /// holder) unless it takes over (`force`), which fences the holder.
    #[default]
    Exclusive,
    /// One of several writers (a clustered file system): shared attaches
    /// coexist, each with its own id; an exclusive holder is refused.
    Shared,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Exclusive => "exclusive",
            AttachMode::Shared => "shared",
        })
    }
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<AttachMode, String> {
        match s {
            "exclusive" => Ok(AttachMode::Exclusive),
            "shared" => Ok(AttachMode::Shared),
            _ => Err(format!("unknown attach mode `{s}`: exclusive or shared")),
        }
    }
}

/// `POST /v1/volumes/{name}/attachments`: attach the volume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    /// A read-only attachment: the nodes refuse its writes. It conflicts
    /// with no other attachment and fences nobody.
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub mode: AttachMode,
    /// Take the volume over from the attachments it conflicts with: they
    /// are ended and fenced (the answer comes once every live node refuses
    /// their writes).
    #[serde(default)]
    pub force: bool,
    /// Who attaches, for operators (host, process, socket); at most 256
    /// bytes.
    #[serde(default)]
    pub holder: String,
}

/// An attachment as the control service records it: the id is assigned
/// here, from a counter that never goes back, and never reused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub id: u32,
    pub volume_id: u64,
    pub volume: String,
    pub read_only: bool,
    /// When it was created (ms since the Unix epoch).
    pub at: u64,
    #[serde(default)]
    pub mode: AttachMode,
    /// The volume's fence generation its capability carries.
    #[serde(default)]
    pub fence: u32,
    /// Who attached (`AttachVolume::holder`).
    #[serde(default)]
    pub holder: String,
}

/// Longest `AttachVolume::holder`.
pub const HOLDER_MAX_BYTES: usize = 256;

/// What an attaching client gets: its attachment, the volume, and the
/// credential the storage nodes require (a capability and its key, hex).
/// The key is a secret: whoever holds it can do what the capability allows
/// until it expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub attachment: AttachmentRecord,
    pub volume: Volume,
    /// The encoded capability (celer_proto::auth::Capability), hex.
    pub capability: String,
    /// The attachment key, hex.
    pub key: String,
    pub expires_unix_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeVolume {
    /// The new size: larger than the current one (grow only).
    pub size_bytes: u64,
}

/// A node as the change log records it (its registration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub data_addr: String,
    pub admin_addr: String,
    pub shards: u16,
    pub domain: String,
}

/// What a change-log entry changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    VolumeCreated {
        volume: Volume,
    },
    VolumeResized {
        id: u64,
        name: String,
        old_size_bytes: u64,
        size_bytes: u64,
    },
    VolumeDeleted {
        id: u64,
        name: String,
    },
    /// A client attached the volume (a capability was handed out).
    VolumeAttached {
        attachment: AttachmentRecord,
    },
    /// An attachment ended (no new capability for it).
    VolumeDetached {
        attachment: AttachmentRecord,
    },
    /// An attachment took the volume over from `from` (ended): the fence
    /// generation went up to `fence`, so their writes are refused.
    VolumeTakenOver {
        volume: String,
        fence: u32,
        from: Vec<u32>,
    },
    /// A node registered (new) or re-registered (same id, maybe new address).
    NodeRegistered {
        node: NodeRecord,
    },
    /// Lease expired.
    NodeDown {
        id: NodeId,
    },
    /// A down node heartbeated again.
    NodeUp {
        id: NodeId,
    },
    /// A new route table.
    RouteEpoch {
        epoch: u64,
        reason: String,
    },
    /// The partition count doubled.
    RouteSplit {
        partition_bits: u8,
    },
    /// Volumes and nodes restored to what they were after entry `seq`; the
    /// entry carries the restored state so a replay needs nothing else.
    Restored {
        seq: u64,
        volumes: Vec<Volume>,
        nodes: Vec<NodeRecord>,
    },
    /// A volume's layers changed (a snapshot taken or deleted, a
    /// rollback): the record after the change.
    VolumeLayersChanged {
        what: String,
        volume: Volume,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::VolumeCreated { volume: v } => write!(
                f,
                "volume {} created (id {}, {} bytes, {} replicas)",
                v.name, v.id, v.size_bytes, v.replicas
            ),
            Change::VolumeResized {
                name,
                old_size_bytes,
                size_bytes,
                ..
            } => write!(
                f,
                "volume {name} resized from {old_size_bytes} to {size_bytes} bytes"
            ),
            Change::VolumeDeleted { id, name } => write!(f, "volume {name} (id {id}) deleted"),
            Change::VolumeAttached { attachment: a } => write!(
                f,
                "volume {} attached as attachment {} ({})",
                a.volume,
                a.id,
                if a.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            ),
            Change::VolumeDetached { attachment: a } => {
                write!(f, "attachment {} of volume {} detached", a.id, a.volume)
            }
            Change::VolumeTakenOver {
                volume,
                fence,
                from,
            } => {
                write!(f, "volume {volume} fenced at generation {fence}")?;
                if !from.is_empty() {
                    write!(f, ", taken over from attachments {from:?}")?;
                }
                Ok(())
            }
            Change::NodeRegistered { node } => write!(
                f,
                "node {} registered (data {}, admin {}, domain {}, {} shards)",
                node.id, node.data_addr, node.admin_addr, node.domain, node.shards
            ),
            Change::NodeDown { id } => write!(f, "node {id} down (lease expired)"),
            Change::NodeUp { id } => write!(f, "node {id} up again"),
            Change::RouteEpoch { epoch, reason } => write!(f, "route epoch {epoch}: {reason}"),
            Change::RouteSplit { partition_bits } => write!(
                f,
                "partitions split to {} (2^{partition_bits})",
                1u64 << partition_bits
            ),
            Change::VolumeLayersChanged { what, volume } => write!(
                f,
                "volume {} (id {}): {what}; head era {}, {} snapshots",
                volume.name,
                volume.id,
                volume.head_era,
                volume.snapshots.len()
            ),
            Change::Restored {
                seq,
                volumes,
                nodes,
            } => write!(
                f,
                "restored to entry {seq} ({} volumes, {} nodes)",
                volumes.len(),
                nodes.len()
            ),
        }
    }
}

/// One change-log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// 1, 2, 3... without gaps.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub at: u64,
    /// The token name (operator) or `node N` or `meta` (lease expiry).
    pub who: String,
    pub what: Change,
    /// The route epoch after the change (0: no table yet).
    pub epoch: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreLog {
    /// Restore volumes and nodes to what they were right after this entry.
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// The entry that records the restore.
    pub seq: u64,
    pub volumes: usize,
    pub nodes: usize,
    /// Volumes and snapshots of the restore point that were deleted since
    /// and are not brought back (the nodes free a deleted layer's data),
    /// each with the reason.
    #[serde(default)]
    pub not_restored: Vec<String>,
    /// Volumes and snapshots made after the restore point, deleted by it.
    #[serde(default)]
    pub removed: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub nodes_up: usize,
    pub nodes_down: usize,
    /// Current route epoch (0: no table yet).
    pub epoch: u64,
    pub partitions: u32,
    /// Every target member holds the partition and in sync.
    pub partitions_in_sync: u32,
    /// A member is syncing or there are fewer members than replicas.
    pub partitions_degraded: u32,
    pub volumes: usize,
    /// Last change-log entry.
    pub log_seq: u64,
    /// This process leads (always true with the redb store).
    pub leader: bool,
    /// Bytes copied by the rebalance (or recovery) under way: the sum of
    /// the up nodes' `backfill_bytes_done` from their last heartbeats. All
    /// three `rebalance_` figures return to 0 once no partition has a
    /// syncing member; moves deferred by the movement budget count from
    /// when they start.
    #[serde(default)]
    pub rebalance_bytes_done: u64,
    /// Bytes it copies in all, as listed so far: the sum of the up nodes'
    /// `backfill_bytes_total`; at least `rebalance_bytes_done`.
    #[serde(default)]
    pub rebalance_bytes_total: u64,
    /// Backfills whose size is not known yet (not in `rebalance_bytes_total`).
    #[serde(default)]
    pub rebalance_partitions_unlisted: u64,
    /// Partitions with a member that is down within the grace period
    /// (counted in `partitions_degraded` too): they take writes with their
    /// other members, and the down one catches up when it returns.
    #[serde(default)]
    pub partitions_down_member: u32,
    /// Partitions with fewer members taking writes than a write must reach
    /// (`RouteTable::min_copies`): their writes wait until a member is back
    /// or a stand-in joins (the control service brings one in at once).
    #[serde(default)]
    pub partitions_write_blocked: u32,
    /// Down nodes still within the grace period: (node, seconds left before
    /// their partitions move to other nodes).
    #[serde(default)]
    pub down_grace_left_s: Vec<(u32, u64)>,
}

/// The longest a `GET /v1/volumes/{name}?size=N&wait_ms=M` long poll
/// waits (below the client's request timeout).
pub const VOLUME_WAIT_MS_MAX: u64 = 8_000;

/// Checks a volume name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    let ok_first = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok_rest = |c: u8| ok_first(c) || matches!(c, b'.' | b'_' | b'-');
    let b = name.as_bytes();
    if b.is_empty() || b.len() > VOLUME_NAME_MAX_BYTES {
        return Err(format!(
            "volume name `{name}` must be 1 to {VOLUME_NAME_MAX_BYTES} characters"
        ));
    }
    if !ok_first(b[0]) || !b[1..].iter().all(|c| ok_rest(*c)) {
        return Err(format!(
            "volume name `{name}` is not valid: use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks a volume size: a positive multiple of 4096, at most 1 PiB.
pub fn validate_volume_size(size_bytes: u64) -> Result<(), String> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(VOLUME_SIZE_ALIGN_BYTES) {
        return Err(format!(
            "volume size {size_bytes} bytes must be a positive multiple of 4096 (e.g. 10G)"
        ));
    }
    if size_bytes > VOLUME_SIZE_MAX_BYTES {
        return Err(format!(
            "volume size {size_bytes} bytes is larger than the 1 PiB limit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A volume stored before the sector size was an attribute (no field)
    /// keeps the 4096-byte sectors its guests always saw; a create request
    /// without it gets the default (512) from the control service.
    #[test]
    fn volumes_stored_without_a_sector_size_keep_4096() {
        let old = r#"{"id":3,"name":"v","size_bytes":4096,"replicas":3,"created_at":1}"#;
        let v: super::Volume = serde_json::from_str(old).expect("old volume record");
        assert_eq!(v.sector_size_bytes, 4096);
        let req: super::CreateVolume =
            serde_json::from_str(r#"{"name":"v","size_bytes":4096}"#).expect("create request");
        assert_eq!(req.sector_size_bytes, None);
    }

    use super::*;

    #[test]
    fn volume_names() {
        for ok in ["a", "0", "vm-1.disk_0", &"a".repeat(63)] {
            assert_eq!(validate_volume_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", ".a", "A", "a b", "a/b", "é", &"a".repeat(64)] {
            assert!(validate_volume_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn volume_sizes() {
        assert!(validate_volume_size(4096).is_ok());
        assert!(validate_sector_size(512).is_ok() && validate_sector_size(4096).is_ok());
        assert!(validate_sector_size(1024).is_err() && validate_sector_size(0).is_err());
        assert!(validate_volume_size(1 << 50).is_ok());
        assert!(validate_volume_size(0).is_err());
        assert!(validate_volume_size(4095).is_err());
        assert!(validate_volume_size(4097).is_err());
        assert!(validate_volume_size((1 << 50) + 4096).is_err());
    }

    #[test]
    fn heartbeats_and_status_from_older_releases_parse() {
        let h: Heartbeat = serde_json::from_str(r#"{"epoch": 7}"#).expect("old heartbeat");
        assert_eq!(
            h,
            Heartbeat {
                epoch: 7,
                ..Heartbeat::default()
            }
        );
        let s: Status = serde_json::from_str(
            r#"{"nodes_up": 3, "nodes_down": 0, "epoch": 4, "partitions": 256,
                "partitions_in_sync": 256, "partitions_degraded": 0, "volumes": 1,
                "log_seq": 9, "leader": true}"#,
        )
        .expect("old status");
        assert_eq!((s.rebalance_bytes_done, s.rebalance_bytes_total), (0, 0));
    }

    #[test]
    fn change_json_is_tagged() {
        let e = LogEntry {
            seq: 1,
            at: 2,
            who: "admin".into(),
            what: Change::NodeDown { id: 3 },
            epoch: 4,
        };
        let j = serde_json::to_value(&e).expect("json");
        assert_eq!(j["what"]["kind"], "NodeDown");
        assert_eq!(
            serde_json::from_value::<LogEntry>(j).expect("back"),
            e,
            "round trip"
        );
    }
}
