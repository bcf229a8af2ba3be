//! The shard handler of a node: one world (the cells this shard owns), one
//! gateway (the sessions whose handshake reached this shard), the stages
//! that carry messages to them, this shard's side of handovers, and the tick
//! that runs it all.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tessera_cells::demo::DemoGame;
use tessera_cells::handover::{AgentOutput, HandoverAgent, HandoverReport};
use tessera_cells::rng::Rng;
use tessera_cells::{CellId, Output, ShardWorld, TickId};
use tessera_coord::{CellLoad, LoadReport, ShardEvent, ShardRef};

use crate::ids::{ShardId, StageId};
use crate::mailbox::Envelope;
use crate::shard::{ShardContext, ShardHandler};
use crate::stage::StageTable;
use crate::tick::Tick;

use super::coordinator::{CoordInput, CoordSender};
use super::gateway::Gateway;
use super::msg::{deliver_cell, CellMsg, ControlMsg, NodeMsg, NodeStage, ShardParts};
use super::router::Router;
use super::shared::{NodeShardStats, NodeShared};

/// Lets the socket watcher wait for the loop to drain the socket before it
/// watches again (a readable socket stays readable until drained).
#[derive(Default)]
struct Rearm {
    armed: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Rearm {
    fn arm(&self) {
        if !self.armed.replace(true) {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.armed.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// One shard of a node.
pub struct NodeShard {
    shard: ShardId,
    shared: Arc<NodeShared>,
    parts: ShardParts,
    coord: CoordSender,
    rearm: Rc<Rearm>,
    npcs: usize,
    seed: u64,
    to_route: Vec<CellMsg>,
    ticks: u64,
    cell_stages: BTreeMap<CellId, StageId>,
    tick_us: Histogram<u64>,
    inputs_seen: BTreeMap<CellId, u64>,
    budget_us: u64,
}

impl NodeShard {
    /// A shard of a node; its cells come from the registry in `shared`.
    pub fn new(
        shard: ShardId,
        shared: Arc<NodeShared>,
        world: ShardWorld<DemoGame>,
        gateway: Gateway,
        coord: CoordSender,
        npcs: usize,
        seed: u64,
    ) -> Self {
        let router = Rc::new(RefCell::new(Router::new(shared.clone())));
        let budget_us = 1_000_000 / u64::from(shared.tick_hz.max(1));
        Self {
            shard,
            parts: ShardParts {
                world: Rc::new(RefCell::new(world)),
                gateway: Rc::new(RefCell::new(gateway)),
                router,
                agent: Rc::new(RefCell::new(HandoverAgent::new(shard.0))),
                control: Rc::new(RefCell::new(VecDeque::new())),
            },
            shared,
            coord,
            rearm: Rc::new(Rearm::default()),
            npcs,
            seed,
            to_route: Vec::new(),
            ticks: 0,
            cell_stages: BTreeMap::new(),
            tick_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            inputs_seen: BTreeMap::new(),
            budget_us,
        }
    }

    fn report(&self, event: ShardEvent) {
        let _ = self.coord.send(CoordInput::Event {
            shard: self.shard.0,
            event,
        });
    }

    fn publish(&self) {
        let gateway = self.parts.gateway.borrow();
        let world = self.parts.world.borrow();
        let cells = world
            .cells()
            .map(|c| {
                let players = c.entities().iter().filter(|e| e.client.is_some()).count();
                (c.id(), c.entities().len(), c.ghosts().len(), players)
            })
            .collect();
        let agent = self.parts.agent.borrow().counters();
        self.shared.publish(
            self.shard.index(),
            NodeShardStats {
                tick: world.tick_id().0,
                sessions: gateway.sessions(),
                gateway: gateway.counters(),
                frames_refused: gateway.refused(),
                endpoint: gateway.endpoint().stats().clone(),
                socket: gateway.socket().stats(),
                router: self.parts.router.borrow().counters(),
                world: world.totals(),
                cells,
                handover: agent,
            },
        );
    }

    /// Once a second: the load of every cell, for the coordinator.
    fn report_load(&mut self) {
        let world = self.parts.world.borrow();
        let mut cells = Vec::new();
        for c in world.cells() {
            let inputs = c.counters().inputs;
            let before = self.inputs_seen.insert(c.id(), inputs).unwrap_or(inputs);
            cells.push(CellLoad {
                cell: c.id(),
                actors: c.entities().len() as u32,
                players: c.entities().iter().filter(|e| e.client.is_some()).count() as u32,
                pps: inputs.saturating_sub(before) as f64,
            });
        }
        let live: std::collections::BTreeSet<CellId> = world.cells().map(|c| c.id()).collect();
        self.inputs_seen.retain(|c, _| live.contains(c));
        drop(world);
        let report = LoadReport {
            shard: self.shard.0,
            tick_us_p99: self.tick_us.value_at_quantile(0.99),
            budget_us: self.budget_us,
            cells,
        };
        self.tick_us.reset();
        self.report(ShardEvent::Load(report));
    }

    fn route_pending(&mut self, cx: &mut ShardContext<NodeMsg>) {
        let mut router = self.parts.router.borrow_mut();
        for env in self.to_route.drain(..) {
            router.send_cell(cx, env);
        }
    }

    fn add_stage(&mut self, stages: &mut StageTable<NodeStage, NodeMsg>, cell: CellId) -> StageId {
        let id = stages.insert(NodeStage::Cell {
            cell,
            parts: self.parts.clone(),
        });
        self.cell_stages.insert(cell, id);
        id
    }

    fn remove_stage(
        &mut self,
        cx: &mut ShardContext<NodeMsg>,
        stages: &mut StageTable<NodeStage, NodeMsg>,
        cell: CellId,
    ) {
        if let Some(id) = self.cell_stages.remove(&cell) {
            if let Some((_, backlog)) = stages.remove(id) {
                for e in backlog {
                    if let NodeMsg::Cell(env) = e.msg {
                        deliver_cell(&self.parts, cx, env);
                    }
                }
            }
        }
    }

    fn agent_outputs(
        &mut self,
        cx: &mut ShardContext<NodeMsg>,
        stages: &mut StageTable<NodeStage, NodeMsg>,
        outputs: Vec<AgentOutput<DemoGame>>,
    ) {
        for o in outputs {
            match o {
                AgentOutput::ToShard(to, m) => {
                    self.parts
                        .router
                        .borrow_mut()
                        .send_control(cx, to, ControlMsg::Handover(m))
                }
                AgentOutput::Forward(cell, msgs) => {
                    let mut router = self.parts.router.borrow_mut();
                    for msg in msgs {
                        router.send_cell(
                            cx,
                            CellMsg {
                                to: cell,
                                from: cell,
                                msg,
                            },
                        );
                    }
                }
                AgentOutput::ToCoordinator(r) => {
                    let now = Instant::now();
                    let event = match r {
                        HandoverReport::Frozen {
                            id,
                            cell,
                            epoch,
                            entities,
                            repeat,
                            tick,
                        } => {
                            if !repeat {
                                tracing::info!(shard = %self.shard, %cell, epoch, tick = tick.0, entities, handover = id.0, "handover: frozen");
                            }
                            ShardEvent::Frozen {
                                id,
                                cell,
                                epoch,
                                at: now,
                                entities,
                                repeat,
                            }
                        }
                        HandoverReport::Prepared { id, cell, repeat } => {
                            // The stage exists before the route points here.
                            let stage = match self.cell_stages.get(&cell) {
                                Some(s) => *s,
                                None => self.add_stage(stages, cell),
                            };
                            ShardEvent::Prepared {
                                id,
                                cell,
                                stage: stage.0,
                                repeat,
                            }
                        }
                        HandoverReport::Activated { id, .. } => {
                            ShardEvent::Activated { id, at: now }
                        }
                        HandoverReport::Released { id, cell, .. } => {
                            self.remove_stage(cx, stages, cell);
                            ShardEvent::Released { id }
                        }
                        HandoverReport::Aborted { id, cell, reason } => {
                            // A shadow's stage goes with the shadow.
                            if !self.parts.world.borrow().owns(cell) {
                                self.remove_stage(cx, stages, cell);
                            }
                            ShardEvent::Aborted { id, reason }
                        }
                    };
                    self.report(event);
                }
            }
        }
    }

    fn handle_control(
        &mut self,
        cx: &mut ShardContext<NodeMsg>,
        stages: &mut StageTable<NodeStage, NodeMsg>,
    ) -> usize {
        let mut n = 0;
        loop {
            let Some(msg) = self.parts.control.borrow_mut().pop_front() else {
                break;
            };
            n += 1;
            let tick = self.parts.world.borrow().tick_id();
            match msg {
                ControlMsg::Handover(m) => {
                    let outputs = {
                        let mut world = self.parts.world.borrow_mut();
                        self.parts.agent.borrow_mut().handle(&mut world, m, tick)
                    };
                    self.agent_outputs(cx, stages, outputs);
                }
                ControlMsg::Split { op, cell } => {
                    let result = self.parts.world.borrow_mut().split(cell);
                    match result {
                        Ok(children) => {
                            self.remove_stage(cx, stages, cell);
                            let children: Vec<(CellId, u32)> = children
                                .iter()
                                .map(|c| (*c, self.add_stage(stages, *c).0))
                                .collect();
                            let layout = self.parts.world.borrow().layout().clone();
                            self.parts.gateway.borrow_mut().set_layout(layout);
                            tracing::info!(shard = %self.shard, %cell, op, tick = tick.0, "split");
                            self.report(ShardEvent::Split {
                                op,
                                parent: cell,
                                children,
                            });
                        }
                        Err(e) => self.report(ShardEvent::Refused {
                            op,
                            reason: e.to_string(),
                        }),
                    }
                }
                ControlMsg::Merge { op, parent } => {
                    let result = self.parts.world.borrow_mut().merge(parent);
                    match result {
                        Ok(()) => {
                            for c in parent.children().into_iter().flatten() {
                                self.remove_stage(cx, stages, c);
                            }
                            let stage = self.add_stage(stages, parent);
                            let layout = self.parts.world.borrow().layout().clone();
                            self.parts.gateway.borrow_mut().set_layout(layout);
                            tracing::info!(shard = %self.shard, cell = %parent, op, tick = tick.0, "merge");
                            self.report(ShardEvent::Merged {
                                op,
                                parent,
                                stage: stage.0,
                            });
                        }
                        Err(e) => self.report(ShardEvent::Refused {
                            op,
                            reason: e.to_string(),
                        }),
                    }
                }
            }
        }
        n
    }
}

impl ShardHandler for NodeShard {
    type Message = NodeMsg;
    type Stage = NodeStage;

    fn on_start(
        &mut self,
        cx: &mut ShardContext<NodeMsg>,
        stages: &mut StageTable<NodeStage, NodeMsg>,
    ) {
        let me = ShardRef::local(self.shard.0);
        let registry = self.parts.router.borrow().registry().clone();
        let gateway_stage = stages.insert(NodeStage::Gateway(self.parts.clone()));
        debug_assert_eq!(gateway_stage.0, 0);
        for (cell, a) in registry.cells_of(me) {
            {
                let mut world = self.parts.world.borrow_mut();
                world.add_cell(cell);
                world.set_epoch(cell, a.epoch);
            }
            let stage = self.add_stage(stages, cell);
            // The registry numbers a shard's stages in cell order from 1.
            assert_eq!(
                stage.0, a.stage,
                "stage numbering differs from the registry's"
            );
        }
        {
            let mut world = self.parts.world.borrow_mut();
            let mut rng = Rng::derive(self.seed, 0x4E9C ^ u64::from(self.shard.0));
            let placed = DemoGame::spawn_npcs(&mut world, self.npcs, &mut rng);
            tracing::info!(shard = %self.shard, cells = world.cell_ids().len(), npcs = placed, "world ready");
        }
        // Watch the socket so that a parked shard wakes on traffic.
        match self.parts.gateway.borrow().socket().readiness() {
            Ok(readiness) => {
                let handle = cx.local_handle();
                let rearm = self.rearm.clone();
                rearm.arm();
                glommio::spawn_local(async move {
                    loop {
                        rearm.wait().await;
                        if readiness.readable().await.is_err() {
                            glommio::timer::sleep(Duration::from_millis(5)).await;
                        }
                        handle.wake();
                    }
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!(shard = %self.shard, error = %e, "no socket watcher: traffic is read at every tick only")
            }
        }
        self.publish();
    }

    fn on_tick(
        &mut self,
        cx: &mut ShardContext<NodeMsg>,
        stages: &mut StageTable<NodeStage, NodeMsg>,
        tick: Tick,
    ) {
        if self.parts.router.borrow_mut().refresh() {
            let layout = self.parts.router.borrow().registry().layout().clone();
            self.parts.world.borrow_mut().set_layout(layout.clone());
            self.parts.gateway.borrow_mut().set_layout(layout);
        }
        self.handle_control(cx, stages);
        // Tick 0 would read as "no baseline" in snapshots: start at 1.
        let id = TickId(tick.id + 1);
        self.parts.gateway.borrow_mut().set_tick(id.0);
        let started = Instant::now();
        let mut outputs = Vec::new();
        {
            let mut world = self.parts.world.borrow_mut();
            world.tick(id);
            outputs.extend(world.drain_outbox());
        }
        let _ = self
            .tick_us
            .record((started.elapsed().as_micros() as u64).max(1));
        {
            let mut router = self.parts.router.borrow_mut();
            for out in outputs {
                match out {
                    Output::Cell(env) => router.send_cell(cx, env),
                    Output::Client(o) => router.send_client(cx, o),
                }
            }
        }
        // Freezes happen here, right after a tick: the target can run the
        // cell from the next one.
        let handover = {
            let mut world = self.parts.world.borrow_mut();
            self.parts.agent.borrow_mut().after_tick(&mut world, id)
        };
        self.agent_outputs(cx, stages, handover);
        self.ticks += 1;
        if self.ticks % u64::from(self.shared.tick_hz.max(1)) == 0 {
            self.publish();
            self.report_load();
        }
    }

    fn on_turn(
        &mut self,
        cx: &mut ShardContext<NodeMsg>,
        stages: &mut StageTable<NodeStage, NodeMsg>,
    ) -> usize {
        let control = self.handle_control(cx, stages);
        let now = Instant::now();
        let (work, drained) = self
            .parts
            .gateway
            .borrow_mut()
            .poll(now, &mut self.to_route);
        self.route_pending(cx);
        let sent = self.parts.gateway.borrow_mut().flush(now);
        if drained {
            self.rearm.arm();
        }
        work + sent + control
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.parts.gateway.borrow_mut().next_deadline()
    }

    fn on_undeliverable(&mut self, cx: &mut ShardContext<NodeMsg>, envelope: Envelope<NodeMsg>) {
        // A stage that is gone: the cell moved; route by cell id again.
        match envelope.msg {
            NodeMsg::Cell(env) => deliver_cell(&self.parts, cx, env),
            NodeMsg::ToClient(out) => self.parts.gateway.borrow_mut().to_client(out),
            NodeMsg::Control(c) => self.parts.control.borrow_mut().push_back(c),
        }
    }

    fn on_stop(
        &mut self,
        _cx: &mut ShardContext<NodeMsg>,
        _stages: &mut StageTable<NodeStage, NodeMsg>,
    ) {
        let mut gateway = self.parts.gateway.borrow_mut();
        let sessions = gateway.sessions();
        gateway.disconnect_all(Instant::now());
        // The endpoint repeats disconnects a few times, milliseconds apart:
        // pump it briefly so that clients hear it even if one copy is lost.
        let until = Instant::now() + Duration::from_millis(60);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
            let now = Instant::now();
            let mut ignored = Vec::new();
            gateway.poll(now, &mut ignored);
            gateway.flush(now);
        }
        tracing::info!(shard = %self.shard, sessions, "sessions told the server is stopping");
    }

    fn on_shutdown(
        &mut self,
        _cx: &mut ShardContext<NodeMsg>,
        _stages: &mut StageTable<NodeStage, NodeMsg>,
    ) {
        self.publish();
    }
}
