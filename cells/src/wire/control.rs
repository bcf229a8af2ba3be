//! Coordinator <-> shard frames: registration, directory, registry, orders,
//! reports and heartbeats.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::verify::{self, FrameError, FrameFamily};
use tessera_schema::wire;

use super::shard::{reason_in, reason_out};
use super::{cell_in, cell_out, header_in, header_out, need, shard_in, shard_out, ShardHeader};
use crate::control::{CellLoad, HandoverId, LoadReport, Order, Report};
use crate::geometry::{CellId, Geometry, Layout};
use crate::ids::TickId;
use crate::registry::{Assignment, Registry, ShardRef};

/// The sender named in the coordinator's control frames (and in a node's
/// join link, which speaks for no shard yet).
pub const COORDINATOR: ShardRef = ShardRef {
    node: u16::MAX,
    shard: u16::MAX,
};

/// What a node does in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NodeRole {
    /// Owns cells and hosts sessions (a single node, or a small cluster).
    #[default]
    Both,
    /// Owns cells; clients do not connect to it.
    Compute,
    /// Hosts client sessions only; owns no cell.
    Gateway,
}

impl NodeRole {
    /// True if the coordinator may give it cells.
    pub fn computes(self) -> bool {
        !matches!(self, NodeRole::Gateway)
    }
}

impl std::str::FromStr for NodeRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "both" => Ok(NodeRole::Both),
            "compute" => Ok(NodeRole::Compute),
            "gateway" => Ok(NodeRole::Gateway),
            _ => Err(format!(
                "unknown role {s:?}: expected both, compute or gateway"
            )),
        }
    }
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeRole::Both => "both",
            NodeRole::Compute => "compute",
            NodeRole::Gateway => "gateway",
        })
    }
}

/// A shard introducing itself to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Its node.
    pub node: u16,
    /// Its index on the node.
    pub shard: u16,
    /// Shards of the node.
    pub shards: u16,
    /// The node's role.
    pub role: NodeRole,
    /// Changes when the node process restarts.
    pub incarnation: u64,
    /// Where shard 0's cluster link listens (shard s: port + s).
    pub cluster_addr: SocketAddr,
    /// Where clients connect, if the node hosts sessions.
    pub game_addr: Option<SocketAddr>,
}

/// A node as the directory lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node.
    pub node: u16,
    /// Its shards.
    pub shards: u16,
    /// Its role.
    pub role: NodeRole,
    /// Shard 0's cluster address (shard s: port + s).
    pub cluster_addr: SocketAddr,
    /// Its game address.
    pub game_addr: Option<SocketAddr>,
    /// Its process's incarnation (a restart changes it).
    pub incarnation: u64,
}

impl NodeInfo {
    /// Where shard `shard` of this node listens for cluster links.
    pub fn shard_addr(&self, shard: u16) -> SocketAddr {
        let mut a = self.cluster_addr;
        a.set_port(a.port().wrapping_add(shard));
        a
    }
}

/// Everything on a coordinator link.
#[derive(Clone, Debug, PartialEq)]
pub enum ControlMsg {
    /// Shard -> coordinator: here I am.
    Register(Registration),
    /// Coordinator -> shard: registered.
    Welcome {
        /// The coordinator's cluster epoch.
        cluster_epoch: u32,
        /// The cluster's tick rate.
        tick_hz: u32,
        /// Unix time (ms) of the cluster's tick 0.
        tick_origin_ms: u64,
    },
    /// Coordinator -> shard: every node and where to reach it.
    Directory(Vec<NodeInfo>),
    /// Coordinator -> shard: the registry, whole.
    Registry(Arc<Registry>),
    /// Coordinator -> shard.
    Order(Order),
    /// Shard -> coordinator.
    Report(Report),
    /// Shard -> coordinator: alive, with a little state.
    Heartbeat {
        /// Its last tick.
        tick: TickId,
        /// Sessions hosted.
        sessions: u32,
        /// Entities owned.
        entities: u32,
        /// Numbers the heartbeats of the link (the ack names it).
        seq: u64,
        /// The node is draining: its cells should move away.
        draining: bool,
    },
    /// Coordinator -> shard: heartbeat `seq` arrived; the shard's lease on
    /// its cells runs `lease_ms` from when it sent that heartbeat.
    HeartbeatAck {
        /// The heartbeat.
        seq: u64,
        /// The lease, milliseconds.
        lease_ms: u32,
        /// The coordinator drains the node: it exits once its cells left.
        draining: bool,
    },
}

impl ControlMsg {
    /// A short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMsg::Register(_) => "register",
            ControlMsg::Welcome { .. } => "welcome",
            ControlMsg::Directory(_) => "directory",
            ControlMsg::Registry(_) => "registry",
            ControlMsg::Order(o) => o.kind(),
            ControlMsg::Report(_) => "report",
            ControlMsg::Heartbeat { .. } => "heartbeat",
            ControlMsg::HeartbeatAck { .. } => "heartbeat-ack",
        }
    }
}

fn role_out(r: NodeRole) -> wire::NodeRole {
    match r {
        NodeRole::Both => wire::NodeRole::Both,
        NodeRole::Compute => wire::NodeRole::Compute,
        NodeRole::Gateway => wire::NodeRole::Gateway,
    }
}

fn role_in(r: wire::NodeRole) -> Result<NodeRole, FrameError> {
    Ok(match r {
        wire::NodeRole::Both => NodeRole::Both,
        wire::NodeRole::Compute => NodeRole::Compute,
        wire::NodeRole::Gateway => NodeRole::Gateway,
        _ => return Err(FrameError::BadValue("role")),
    })
}

fn addr_in(s: &str, field: &'static str) -> Result<SocketAddr, FrameError> {
    s.parse().map_err(|_| FrameError::BadValue(field))
}

/// Encodes a control message with its header.
pub fn encode_control(header: &ShardHeader, msg: &ControlMsg) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let fbb = &mut fbb;
    macro_rules! t {
        ($ty:ident, $args:ident { $($f:tt)* }) => {{
            let t = wire::$ty::create(fbb, &wire::$args { $($f)* });
            (wire::ControlMsg::$ty, t.as_union_value())
        }};
    }
    let (tag, table) = match msg {
        ControlMsg::Register(r) => {
            let cluster = fbb.create_string(&r.cluster_addr.to_string());
            let game = r.game_addr.map(|a| fbb.create_string(&a.to_string()));
            t!(
                Register,
                RegisterArgs {
                    node: r.node,
                    shard: r.shard,
                    shards: r.shards,
                    role: role_out(r.role),
                    incarnation: r.incarnation,
                    cluster_addr: Some(cluster),
                    game_addr: game,
                }
            )
        }
        ControlMsg::Welcome {
            cluster_epoch,
            tick_hz,
            tick_origin_ms,
        } => t!(
            CoordWelcome,
            CoordWelcomeArgs {
                cluster_epoch: *cluster_epoch,
                tick_hz: *tick_hz,
                tick_origin_ms: *tick_origin_ms,
            }
        ),
        ControlMsg::Directory(nodes) => {
            let recs: Vec<_> = nodes
                .iter()
                .map(|n| {
                    let cluster = fbb.create_string(&n.cluster_addr.to_string());
                    let game = n.game_addr.map(|a| fbb.create_string(&a.to_string()));
                    wire::NodeRec::create(
                        fbb,
                        &wire::NodeRecArgs {
                            node: n.node,
                            shards: n.shards,
                            role: role_out(n.role),
                            cluster_addr: Some(cluster),
                            game_addr: game,
                            incarnation: n.incarnation,
                        },
                    )
                })
                .collect();
            let nodes = fbb.create_vector(&recs);
            t!(Directory, DirectoryArgs { nodes: Some(nodes) })
        }
        ControlMsg::Registry(r) => {
            let layout = r.layout();
            let g = layout.geometry();
            let split: Vec<_> = layout.split_cells().into_iter().map(cell_out).collect();
            let split = fbb.create_vector(&split);
            let cells: Vec<_> = r
                .iter()
                .map(|(c, a)| wire::CellAssignment::new(&cell_out(c), &shard_out(a.owner), a.epoch))
                .collect();
            let cells = fbb.create_vector(&cells);
            let backups: Vec<_> = r
                .backups()
                .iter()
                .map(|(s, b)| wire::BackupRec::new(&shard_out(*s), &shard_out(*b)))
                .collect();
            let backups = fbb.create_vector(&backups);
            let incarnations: Vec<_> = r
                .incarnations()
                .iter()
                .map(|(n, i)| wire::IncarnationRec::new(*n, *i))
                .collect();
            let incarnations = fbb.create_vector(&incarnations);
            let frozen: Vec<_> = r
                .frozen_copies()
                .iter()
                .map(|(c, f)| {
                    wire::FrozenRec::new(
                        &cell_out(*c),
                        f.handover,
                        &shard_out(f.source),
                        &shard_out(f.holder),
                        &shard_out(f.target),
                    )
                })
                .collect();
            let frozen = fbb.create_vector(&frozen);
            t!(
                RegistryRec,
                RegistryRecArgs {
                    backups: Some(backups),
                    incarnations: Some(incarnations),
                    frozen: Some(frozen),
                    version: r.version(),
                    cluster_epoch: r.cluster_epoch(),
                    geometry: Some(&wire::GeometryRec::new(
                        g.world,
                        g.cell_size,
                        g.columns,
                        g.rows
                    )),
                    split: Some(split),
                    cells: Some(cells),
                }
            )
        }
        ControlMsg::Order(o) => match o {
            Order::Begin {
                id,
                cell,
                to,
                epoch,
            } => t!(
                BeginOrder,
                BeginOrderArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    to: Some(&shard_out(*to)),
                    epoch: *epoch,
                }
            ),
            Order::Commit { id, cell, epoch } => t!(
                CommitOrder,
                CommitOrderArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    epoch: *epoch,
                }
            ),
            Order::Abort { id, cell, reason } => t!(
                AbortOrder,
                AbortOrderArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    reason: reason_out(*reason),
                }
            ),
            Order::Split { op, cell } => t!(
                SplitOrder,
                SplitOrderArgs {
                    op: *op,
                    cell: Some(&cell_out(*cell)),
                }
            ),
            Order::Merge { op, parent } => t!(
                MergeOrder,
                MergeOrderArgs {
                    op: *op,
                    parent: Some(&cell_out(*parent)),
                }
            ),
            Order::Reclaim {
                id,
                cell,
                epoch,
                lost,
            } => t!(
                ReclaimOrder,
                ReclaimOrderArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    epoch: *epoch,
                    lost: Some(&shard_out(*lost)),
                }
            ),
            Order::Promote {
                from,
                cells,
                fallback,
            } => {
                let recs: Vec<_> = cells
                    .iter()
                    .map(|(c, e)| wire::CellAssignment::new(&cell_out(*c), &shard_out(*from), *e))
                    .collect();
                let cells = fbb.create_vector(&recs);
                let fallback: Vec<_> = fallback.iter().map(|c| cell_out(*c)).collect();
                let fallback = fbb.create_vector(&fallback);
                t!(
                    PromoteOrder,
                    PromoteOrderArgs {
                        from: Some(&shard_out(*from)),
                        cells: Some(cells),
                        fallback: Some(fallback),
                    }
                )
            }
        },
        ControlMsg::Report(r) => match r {
            Report::Frozen {
                id,
                cell,
                epoch,
                tick,
                entities,
                repeat,
            } => t!(
                FrozenReport,
                FrozenReportArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    epoch: *epoch,
                    tick: tick.0,
                    entities: *entities as u64,
                    repeat: *repeat,
                }
            ),
            Report::Prepared { id, cell, repeat } => t!(
                PreparedReport,
                PreparedReportArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    repeat: *repeat,
                }
            ),
            Report::Activated { id, cell } => t!(
                ActivatedReport,
                ActivatedReportArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                }
            ),
            Report::Durable { id, cell } => t!(
                DurableReport,
                DurableReportArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                }
            ),
            Report::Released {
                id,
                cell,
                forwarded,
            } => t!(
                ReleasedReport,
                ReleasedReportArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    forwarded: *forwarded as u64,
                }
            ),
            Report::Aborted { id, cell, reason } => t!(
                AbortedReport,
                AbortedReportArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    reason: reason_out(*reason),
                }
            ),
            Report::Split { op, parent } => t!(
                SplitReport,
                SplitReportArgs {
                    op: *op,
                    parent: Some(&cell_out(*parent)),
                }
            ),
            Report::Merged { op, parent } => t!(
                MergedReport,
                MergedReportArgs {
                    op: *op,
                    parent: Some(&cell_out(*parent)),
                }
            ),
            Report::Refused { op, reason } => {
                let reason = fbb.create_string(reason);
                t!(
                    RefusedReport,
                    RefusedReportArgs {
                        op: *op,
                        reason: Some(reason),
                    }
                )
            }
            Report::Promoted {
                from,
                cells,
                missing,
                replica_tick,
                tick,
                entities,
            } => {
                let cells: Vec<_> = cells.iter().map(|c| cell_out(*c)).collect();
                let cells = fbb.create_vector(&cells);
                let missing: Vec<_> = missing.iter().map(|c| cell_out(*c)).collect();
                let missing = fbb.create_vector(&missing);
                t!(
                    PromotedReport,
                    PromotedReportArgs {
                        from: Some(&shard_out(*from)),
                        cells: Some(cells),
                        missing: Some(missing),
                        replica_tick: replica_tick.0,
                        tick: tick.0,
                        entities: *entities as u64,
                    }
                )
            }
            Report::Load(l) => {
                let cells: Vec<_> = l
                    .cells
                    .iter()
                    .map(|c| wire::CellLoadRec::new(&cell_out(c.cell), c.actors, c.players, c.pps))
                    .collect();
                let cells = fbb.create_vector(&cells);
                t!(
                    LoadReport,
                    LoadReportArgs {
                        tick_us_p99: l.tick_us_p99,
                        budget_us: l.budget_us,
                        cells: Some(cells),
                    }
                )
            }
        },
        ControlMsg::Heartbeat {
            tick,
            sessions,
            entities,
            seq,
            draining,
        } => t!(
            Heartbeat,
            HeartbeatArgs {
                tick: tick.0,
                sessions: *sessions,
                entities: *entities,
                seq: *seq,
                draining: *draining,
            }
        ),
        ControlMsg::HeartbeatAck {
            seq,
            lease_ms,
            draining,
        } => t!(
            HeartbeatAck,
            HeartbeatAckArgs {
                seq: *seq,
                lease_ms: *lease_ms,
                draining: *draining,
            }
        ),
    };
    let h = header_out(header);
    let frame = wire::ControlFrame::create(
        fbb,
        &wire::ControlFrameArgs {
            header: Some(&h),
            msg_type: tag,
            msg: Some(table),
        },
    );
    fbb.finish(frame, None);
    fbb.finished_data().to_vec()
}

/// The largest world a registry may describe: columns and rows, and
/// columns x rows (checked before anything is built from them).
const GRID_MAX: i32 = 1 << 12;
const GRID_CELLS_MAX: i64 = 1 << 18;

fn registry_in(r: &wire::RegistryRec) -> Result<Registry, FrameError> {
    let g = need(r.geometry(), "registry.geometry")?;
    let valid = g.cell_size().is_finite()
        && g.cell_size() > 0.0
        && (1..=GRID_MAX).contains(&g.columns())
        && (1..=GRID_MAX).contains(&g.rows());
    let roots = i64::from(g.columns()) * i64::from(g.rows());
    if !valid || roots > GRID_CELLS_MAX {
        return Err(FrameError::BadValue("registry.geometry"));
    }
    // Every split adds three leaves: the counts must agree before the
    // layout's leaves are listed (a lie here would cost memory, not safety).
    let splits = r.split().map_or(0, |v| v.len()) as i64;
    let cells = r.cells().map_or(0, |v| v.len()) as i64;
    if cells != roots + 3 * splits {
        return Err(FrameError::BadValue("registry.cells"));
    }
    let mut layout = Layout::new(Geometry::new(
        g.world(),
        g.cell_size(),
        g.columns(),
        g.rows(),
    ));
    let mut split: Vec<CellId> = Vec::new();
    for c in r.split().iter().flat_map(|v| v.iter()) {
        split.push(cell_in(c, "registry.split")?);
    }
    split.sort_by_key(|c| (c.depth, *c));
    for c in split {
        layout
            .split(c)
            .map_err(|_| FrameError::BadValue("registry.split"))?;
    }
    let mut cells = BTreeMap::new();
    for a in r.cells().iter().flat_map(|v| v.iter()) {
        let cell = cell_in(a.cell(), "registry.cells")?;
        let prev = cells.insert(
            cell,
            Assignment {
                owner: shard_in(a.owner()),
                epoch: a.epoch(),
            },
        );
        if prev.is_some() {
            return Err(FrameError::BadValue("registry.cells"));
        }
    }
    let mut backups = BTreeMap::new();
    for b in r.backups().iter().flat_map(|v| v.iter()) {
        if backups
            .insert(shard_in(b.shard()), shard_in(b.backup()))
            .is_some()
        {
            return Err(FrameError::BadValue("registry.backups"));
        }
    }
    let mut incarnations = BTreeMap::new();
    for i in r.incarnations().iter().flat_map(|v| v.iter()) {
        if incarnations.insert(i.node(), i.incarnation()).is_some() {
            return Err(FrameError::BadValue("registry.incarnations"));
        }
    }
    let mut frozen = BTreeMap::new();
    for f in r.frozen().iter().flat_map(|v| v.iter()) {
        let cell = cell_in(f.cell(), "registry.frozen")?;
        // A frozen copy is of a cell the registry assigns, once.
        if !cells.contains_key(&cell) {
            return Err(FrameError::BadValue("registry.frozen"));
        }
        let copy = crate::registry::FrozenCopy {
            handover: f.handover(),
            source: shard_in(f.source()),
            holder: shard_in(f.holder()),
            target: shard_in(f.target()),
        };
        if frozen.insert(cell, copy).is_some() {
            return Err(FrameError::BadValue("registry.frozen"));
        }
    }
    Registry::from_parts(Arc::new(layout), cells, r.version(), r.cluster_epoch())
        .map(|r| {
            r.with_backups(backups)
                .with_incarnations(incarnations)
                .with_frozen_copies(frozen)
        })
        .map_err(|_| FrameError::BadValue("registry.cells"))
}

/// Verifies and decodes a control frame.
pub fn decode_control(bytes: &[u8]) -> Result<(ShardHeader, ControlMsg), FrameError> {
    let f = verify::control_frame(bytes)?;
    let header = header_in(need(f.header(), "header")?)?;
    let cell = |c: Option<&wire::CellId>, field| cell_in(need(c, field)?, field);
    let msg = if let Some(m) = f.msg_as_register() {
        ControlMsg::Register(Registration {
            node: m.node(),
            shard: m.shard(),
            shards: m.shards(),
            role: role_in(m.role())?,
            incarnation: m.incarnation(),
            cluster_addr: addr_in(m.cluster_addr(), "register.cluster_addr")?,
            game_addr: m
                .game_addr()
                .map(|a| addr_in(a, "register.game_addr"))
                .transpose()?,
        })
    } else if let Some(m) = f.msg_as_coord_welcome() {
        ControlMsg::Welcome {
            cluster_epoch: m.cluster_epoch(),
            tick_hz: m.tick_hz(),
            tick_origin_ms: m.tick_origin_ms(),
        }
    } else if let Some(m) = f.msg_as_directory() {
        let mut nodes = Vec::new();
        for n in m.nodes().iter().flat_map(|v| v.iter()) {
            nodes.push(NodeInfo {
                node: n.node(),
                shards: n.shards(),
                role: role_in(n.role())?,
                cluster_addr: addr_in(n.cluster_addr(), "node.cluster_addr")?,
                game_addr: n
                    .game_addr()
                    .map(|a| addr_in(a, "node.game_addr"))
                    .transpose()?,
                incarnation: n.incarnation(),
            });
        }
        ControlMsg::Directory(nodes)
    } else if let Some(m) = f.msg_as_registry_rec() {
        ControlMsg::Registry(Arc::new(registry_in(&m)?))
    } else if let Some(m) = f.msg_as_begin_order() {
        ControlMsg::Order(Order::Begin {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "begin.cell")?,
            to: shard_in(need(m.to(), "begin.to")?),
            epoch: m.epoch(),
        })
    } else if let Some(m) = f.msg_as_commit_order() {
        ControlMsg::Order(Order::Commit {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "commit.cell")?,
            epoch: m.epoch(),
        })
    } else if let Some(m) = f.msg_as_abort_order() {
        ControlMsg::Order(Order::Abort {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "abort.cell")?,
            reason: reason_in(m.reason())?,
        })
    } else if let Some(m) = f.msg_as_split_order() {
        ControlMsg::Order(Order::Split {
            op: m.op(),
            cell: cell(m.cell(), "split.cell")?,
        })
    } else if let Some(m) = f.msg_as_merge_order() {
        ControlMsg::Order(Order::Merge {
            op: m.op(),
            parent: cell(m.parent(), "merge.parent")?,
        })
    } else if let Some(m) = f.msg_as_frozen_report() {
        ControlMsg::Report(Report::Frozen {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "frozen.cell")?,
            epoch: m.epoch(),
            tick: TickId(m.tick()),
            entities: m.entities() as usize,
            repeat: m.repeat(),
        })
    } else if let Some(m) = f.msg_as_prepared_report() {
        ControlMsg::Report(Report::Prepared {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "prepared.cell")?,
            repeat: m.repeat(),
        })
    } else if let Some(m) = f.msg_as_activated_report() {
        ControlMsg::Report(Report::Activated {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "activated.cell")?,
        })
    } else if let Some(m) = f.msg_as_durable_report() {
        ControlMsg::Report(Report::Durable {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "durable.cell")?,
        })
    } else if let Some(m) = f.msg_as_released_report() {
        ControlMsg::Report(Report::Released {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "released.cell")?,
            forwarded: m.forwarded() as usize,
        })
    } else if let Some(m) = f.msg_as_aborted_report() {
        ControlMsg::Report(Report::Aborted {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "aborted.cell")?,
            reason: reason_in(m.reason())?,
        })
    } else if let Some(m) = f.msg_as_split_report() {
        ControlMsg::Report(Report::Split {
            op: m.op(),
            parent: cell(m.parent(), "split.parent")?,
        })
    } else if let Some(m) = f.msg_as_merged_report() {
        ControlMsg::Report(Report::Merged {
            op: m.op(),
            parent: cell(m.parent(), "merged.parent")?,
        })
    } else if let Some(m) = f.msg_as_refused_report() {
        ControlMsg::Report(Report::Refused {
            op: m.op(),
            reason: m.reason().unwrap_or_default().chars().take(512).collect(),
        })
    } else if let Some(m) = f.msg_as_load_report() {
        let mut cells = Vec::new();
        for c in m.cells().iter().flat_map(|v| v.iter()) {
            if !(c.pps().is_finite() && c.pps() >= 0.0) {
                return Err(FrameError::BadValue("load.pps"));
            }
            cells.push(CellLoad {
                cell: cell_in(c.cell(), "load.cell")?,
                actors: c.actors(),
                players: c.players(),
                pps: c.pps(),
            });
        }
        ControlMsg::Report(Report::Load(LoadReport {
            tick_us_p99: m.tick_us_p99(),
            budget_us: m.budget_us(),
            cells,
        }))
    } else if let Some(m) = f.msg_as_heartbeat() {
        ControlMsg::Heartbeat {
            tick: TickId(m.tick()),
            sessions: m.sessions(),
            entities: m.entities(),
            seq: m.seq(),
            draining: m.draining(),
        }
    } else if let Some(m) = f.msg_as_heartbeat_ack() {
        ControlMsg::HeartbeatAck {
            seq: m.seq(),
            lease_ms: m.lease_ms(),
            draining: m.draining(),
        }
    } else if let Some(m) = f.msg_as_reclaim_order() {
        ControlMsg::Order(Order::Reclaim {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "reclaim.cell")?,
            epoch: m.epoch(),
            lost: shard_in(need(m.lost(), "reclaim.lost")?),
        })
    } else if let Some(m) = f.msg_as_promote_order() {
        let mut cells = Vec::new();
        for a in m.cells().iter().flat_map(|v| v.iter()) {
            cells.push((cell_in(a.cell(), "promote.cells")?, a.epoch()));
        }
        let mut fallback = Vec::new();
        for c in m.fallback().iter().flat_map(|v| v.iter()) {
            fallback.push(cell_in(c, "promote.fallback")?);
        }
        ControlMsg::Order(Order::Promote {
            from: shard_in(need(m.from(), "promote.from")?),
            cells,
            fallback,
        })
    } else if let Some(m) = f.msg_as_promoted_report() {
        let cells_of = |v: Option<tessera_schema::flatbuffers::Vector<'_, wire::CellId>>,
                        field: &'static str|
         -> Result<Vec<CellId>, FrameError> {
            v.iter()
                .flat_map(|v| v.iter())
                .map(|c| cell_in(c, field))
                .collect()
        };
        ControlMsg::Report(Report::Promoted {
            from: shard_in(need(m.from(), "promoted.from")?),
            cells: cells_of(m.cells(), "promoted.cells")?,
            missing: cells_of(m.missing(), "promoted.missing")?,
            replica_tick: TickId(m.replica_tick()),
            tick: TickId(m.tick()),
            entities: m.entities() as usize,
        })
    } else {
        return Err(FrameError::UnknownMessage {
            family: FrameFamily::Control,
            tag: f.msg_type().0,
        });
    };
    Ok((header, msg))
}
