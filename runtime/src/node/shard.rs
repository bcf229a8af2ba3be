//! The shard handler of a node: one world (the cells this shard owns), one
//! gateway (the sessions whose handshake reached this shard), the stages
//! that carry messages to them, and the tick that runs it all.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use tessera_cells::demo::DemoGame;
use tessera_cells::rng::Rng;
use tessera_cells::{Output, ShardWorld, TickId};
use tessera_coord::ShardRef;

use crate::ids::ShardId;
use crate::mailbox::Envelope;
use crate::shard::{ShardContext, ShardHandler};
use crate::stage::StageTable;
use crate::tick::Tick;

use super::gateway::Gateway;
use super::msg::{CellMsg, NodeMsg, NodeStage};
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
    world: Rc<RefCell<ShardWorld<DemoGame>>>,
    gateway: Rc<RefCell<Gateway>>,
    router: Rc<RefCell<Router>>,
    rearm: Rc<Rearm>,
    npcs: usize,
    seed: u64,
    to_route: Vec<CellMsg>,
    ticks: u64,
}

impl NodeShard {
    /// A shard of a node; its cells come from the registry in `shared`.
    pub fn new(
        shard: ShardId,
        shared: Arc<NodeShared>,
        world: ShardWorld<DemoGame>,
        gateway: Gateway,
        npcs: usize,
        seed: u64,
    ) -> Self {
        let router = Rc::new(RefCell::new(Router::new(shared.clone())));
        Self {
            shard,
            shared,
            world: Rc::new(RefCell::new(world)),
            gateway: Rc::new(RefCell::new(gateway)),
            router,
            rearm: Rc::new(Rearm::default()),
            npcs,
            seed,
            to_route: Vec::new(),
            ticks: 0,
        }
    }

    fn publish(&self) {
        let gateway = self.gateway.borrow();
        let world = self.world.borrow();
        let cells = world
            .cells()
            .map(|c| {
                let players = c.entities().iter().filter(|e| e.client.is_some()).count();
                (c.id(), c.entities().len(), c.ghosts().len(), players)
            })
            .collect();
        self.shared.publish(
            self.shard.index(),
            NodeShardStats {
                tick: world.tick_id().0,
                sessions: gateway.sessions(),
                gateway: gateway.counters(),
                frames_refused: gateway.refused(),
                endpoint: gateway.endpoint().stats().clone(),
                socket: gateway.socket().stats(),
                router: self.router.borrow().counters(),
                world: world.totals(),
                cells,
            },
        );
    }

    fn route_pending(&mut self, cx: &mut ShardContext<NodeMsg>) {
        let mut router = self.router.borrow_mut();
        for env in self.to_route.drain(..) {
            router.send_cell(cx, env);
        }
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
        let registry = self.router.borrow().registry().clone();
        let gateway_stage = stages.insert(NodeStage::Gateway {
            gateway: self.gateway.clone(),
            router: self.router.clone(),
        });
        debug_assert_eq!(gateway_stage.0, 0);
        {
            let mut world = self.world.borrow_mut();
            for (cell, a) in registry.cells_of(me) {
                world.add_cell(cell);
                let stage = stages.insert(NodeStage::Cell {
                    cell,
                    world: self.world.clone(),
                    router: self.router.clone(),
                });
                // The registry numbers a shard's stages in cell order from 1.
                assert_eq!(
                    stage.0, a.stage,
                    "stage numbering differs from the registry's"
                );
            }
            let mut rng = Rng::derive(self.seed, 0x4E9C ^ u64::from(self.shard.0));
            let placed = DemoGame::spawn_npcs(&mut world, self.npcs, &mut rng);
            tracing::info!(shard = %self.shard, cells = world.cell_ids().len(), npcs = placed, "world ready");
        }
        // Watch the socket so that a parked shard wakes on traffic.
        match self.gateway.borrow().socket().readiness() {
            Ok(readiness) => {
                let handle = cx.local_handle();
                let rearm = self.rearm.clone();
                rearm.arm();
                glommio::spawn_local(async move {
                    loop {
                        rearm.wait().await;
                        if readiness.readable().await.is_err() {
                            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
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
        _stages: &mut StageTable<NodeStage, NodeMsg>,
        tick: Tick,
    ) {
        self.router.borrow_mut().refresh();
        // Tick 0 would read as "no baseline" in snapshots: start at 1.
        let id = TickId(tick.id + 1);
        self.gateway.borrow_mut().set_tick(id.0);
        let mut outputs = Vec::new();
        {
            let mut world = self.world.borrow_mut();
            world.tick(id);
            outputs.extend(world.drain_outbox());
        }
        {
            let mut router = self.router.borrow_mut();
            for out in outputs {
                match out {
                    Output::Cell(env) => router.send_cell(cx, env),
                    Output::Client(o) => router.send_client(cx, o),
                }
            }
        }
        self.ticks += 1;
        if self.ticks % u64::from(self.shared.tick_hz.max(1)) == 0 {
            self.publish();
        }
    }

    fn on_turn(
        &mut self,
        cx: &mut ShardContext<NodeMsg>,
        _stages: &mut StageTable<NodeStage, NodeMsg>,
    ) -> usize {
        let now = Instant::now();
        let (work, drained) = self.gateway.borrow_mut().poll(now, &mut self.to_route);
        self.route_pending(cx);
        let sent = self.gateway.borrow_mut().flush(now);
        if drained {
            self.rearm.arm();
        }
        work + sent
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.gateway.borrow_mut().next_deadline()
    }

    fn on_undeliverable(&mut self, cx: &mut ShardContext<NodeMsg>, envelope: Envelope<NodeMsg>) {
        // A stage that is gone: the cell moved; route by cell id again.
        match envelope.msg {
            NodeMsg::Cell(env) => self.router.borrow_mut().send_cell(cx, env),
            NodeMsg::ToClient(out) => self.gateway.borrow_mut().to_client(out),
        }
    }

    fn on_stop(
        &mut self,
        _cx: &mut ShardContext<NodeMsg>,
        _stages: &mut StageTable<NodeStage, NodeMsg>,
    ) {
        let mut gateway = self.gateway.borrow_mut();
        let sessions = gateway.sessions();
        gateway.disconnect_all(Instant::now());
        // The endpoint repeats disconnects a few times, milliseconds apart:
        // pump it briefly so that clients hear it even if one copy is lost.
        let until = Instant::now() + std::time::Duration::from_millis(60);
        while Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
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
