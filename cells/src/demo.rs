//! The demo game: validated movement, wandering NPCs, a melee attack with
//! range, cooldown, damage, death and respawn. Small on purpose: it proves
//! the engine (attacks on entities owned by other cells or shards go through
//! intents) and loads it for benchmarks.

use tessera_schema::client::{ActionCmd, InputCmd};
use tessera_schema::wire::{EntityKind, EventKind};

use crate::entity::{Entity, EntityStore};
use crate::game::{GameContext, GameLogic};
use crate::geometry::{Rect, Vec2};
use crate::ids::{EntityId, TickId};
use crate::rng::Rng;
use crate::wire::ByteReader;
use crate::world::ShardWorld;

/// Tunables of the demo game.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoConfig {
    /// Player top speed, m/s.
    pub player_speed: f32,
    /// NPC walking speed, m/s.
    pub npc_speed: f32,
    /// How far NPCs wander from where they stand, metres.
    pub wander_radius: f32,
    /// Melee reach, metres (plus one tick of movement of slack).
    pub attack_range: f32,
    /// Ticks between two attacks of one entity.
    pub attack_cooldown_ticks: u64,
    /// Damage per hit.
    pub damage: u16,
    /// Full health.
    pub max_health: u16,
    /// Ticks a dead entity waits before respawning.
    pub respawn_ticks: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            player_speed: 6.0,
            npc_speed: 2.0,
            wander_radius: 40.0,
            attack_range: 3.0,
            attack_cooldown_ticks: 10,
            damage: 10,
            max_health: 100,
            respawn_ticks: 60,
        }
    }
}

/// Per-entity state of the demo game.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoComponents {
    /// Current health.
    pub health: u16,
    /// Dead until respawned.
    pub dead: bool,
    /// No attack before this tick.
    pub cooldown_until: u64,
    /// Where an NPC is walking to.
    pub wander_to: Option<Vec2>,
    /// Where it respawns.
    pub home: Vec2,
    /// Kills scored.
    pub kills: u32,
}

/// What the demo game asks of other entities.
#[derive(Clone, Debug, PartialEq)]
pub enum DemoIntent {
    /// A melee hit.
    Attack {
        /// Who hits.
        attacker: EntityId,
        /// Where the attacker stood when it swung.
        attacker_pos: Vec2,
        /// Who is hit.
        target: EntityId,
        /// How hard.
        damage: u16,
    },
}

/// How long an attacker keeps its target in view after a hit, wherever the
/// target goes.
pub const TARGET_LOCK_SECONDS: f32 = 5.0;

/// Job: bring a dead entity back.
pub const JOB_RESPAWN: u32 = 1;
/// State flag: dead.
pub const STATE_DEAD: u8 = 1;

/// The demo game.
#[derive(Clone, Debug, Default)]
pub struct DemoGame {
    /// Its tunables.
    pub config: DemoConfig,
}

impl DemoGame {
    /// The demo game with these tunables.
    pub fn new(config: DemoConfig) -> Self {
        Self { config }
    }

    /// A wandering NPC.
    pub fn npc(&self, id: EntityId, pos: Vec2) -> Entity<DemoComponents> {
        Entity::new(
            id,
            EntityKind::Npc,
            pos,
            DemoComponents {
                health: self.config.max_health,
                dead: false,
                cooldown_until: 0,
                wander_to: None,
                home: pos,
                kills: 0,
            },
        )
    }

    /// Spawns `count` NPCs uniformly over the cells `world` owns. Returns
    /// how many were placed.
    pub fn spawn_npcs(world: &mut ShardWorld<DemoGame>, count: usize, rng: &mut Rng) -> usize {
        let cells: Vec<Rect> = world.cells().map(|c| c.bounds()).collect();
        if cells.is_empty() {
            return 0;
        }
        let mut placed = 0;
        for i in 0..count {
            let b = cells[i % cells.len()];
            let pos = Vec2::new(rng.range(b.min.x, b.max.x), rng.range(b.min.y, b.max.y));
            let id = world.allocate_id();
            let npc = world.game().npc(id, b.clamp(pos));
            if world.spawn(npc) {
                placed += 1;
            }
        }
        placed
    }
}

impl GameLogic for DemoGame {
    type Components = DemoComponents;
    type Intent = DemoIntent;

    fn spawn_point(&self, name: &str, join_serial: u64, world: Rect) -> Vec2 {
        // Deterministic: the same name and serial always spawn at the same place.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x1000_0000_01b3);
        }
        let mut rng = Rng::derive(h, join_serial);
        world.clamp(Vec2::new(
            rng.range(world.min.x, world.max.x),
            rng.range(world.min.y, world.max.y),
        ))
    }

    fn new_player(&mut self, _cx: &mut GameContext<'_>, _name: &str) -> DemoComponents {
        DemoComponents {
            health: self.config.max_health,
            dead: false,
            cooldown_until: 0,
            wander_to: None,
            home: Vec2::default(),
            kills: 0,
        }
    }

    fn apply_input(
        &mut self,
        cx: &mut GameContext<'_>,
        e: &mut Entity<DemoComponents>,
        input: &InputCmd,
        intents: &mut Vec<DemoIntent>,
    ) {
        if e.game.dead {
            e.vel = Vec2::default();
            cx.counters.inputs_rejected += 1;
            return;
        }
        let m = Vec2::new(input.movement[0], input.movement[1]);
        if !m.is_finite() {
            // Never trust the client: a NaN would poison the position.
            cx.counters.inputs_rejected += 1;
            e.vel = Vec2::default();
        } else {
            let len = m.length();
            let dir = if len > 1.0 {
                cx.counters.inputs_clamped += 1;
                m * (1.0 / len)
            } else {
                m
            };
            e.vel = dir * self.config.player_speed;
        }
        if input.heading.is_finite() {
            e.heading = input.heading;
        }
        for action in &input.actions {
            match *action {
                ActionCmd::Attack { target } => {
                    if target == e.id.0 || cx.tick.0 < e.game.cooldown_until {
                        cx.counters.actions_rejected += 1;
                        continue;
                    }
                    e.game.cooldown_until = cx.tick.0 + self.config.attack_cooldown_ticks;
                    intents.push(DemoIntent::Attack {
                        attacker: e.id,
                        attacker_pos: e.pos,
                        target: EntityId(target),
                        damage: self.config.damage,
                    });
                    cx.event(EventKind::Attack, e.id, EntityId(target), 0);
                    // A locked target stays in view for a while wherever it
                    // runs (interest beyond distance).
                    let ticks = (TARGET_LOCK_SECONDS / cx.dt.max(1e-3)) as u64;
                    e.keep_in_view(EntityId(target), TickId(cx.tick.0 + ticks));
                }
            }
        }
    }

    fn simulate(
        &mut self,
        cx: &mut GameContext<'_>,
        entities: &mut EntityStore<DemoComponents>,
        _intents: &mut Vec<DemoIntent>,
    ) {
        for e in entities.iter_mut() {
            if e.game.dead {
                e.vel = Vec2::default();
                continue;
            }
            if e.kind != EntityKind::Npc {
                continue;
            }
            let arrived = e
                .game
                .wander_to
                .is_none_or(|t| t.distance_squared(e.pos) < 1.0);
            if arrived {
                let r = self.config.wander_radius;
                let t = Vec2::new(e.pos.x + cx.rng.range(-r, r), e.pos.y + cx.rng.range(-r, r));
                e.game.wander_to = Some(cx.world.clamp(t));
            }
            let to = e.game.wander_to.unwrap_or(e.pos) - e.pos;
            let len = to.length();
            e.vel = if len > 1e-3 {
                to * (self.config.npc_speed / len)
            } else {
                Vec2::default()
            };
            e.heading = e.vel.y.atan2(e.vel.x);
        }
    }

    fn run_job(&mut self, cx: &mut GameContext<'_>, e: &mut Entity<DemoComponents>, kind: u32) {
        if kind == JOB_RESPAWN && e.game.dead {
            e.game.dead = false;
            e.game.health = self.config.max_health;
            e.vel = Vec2::default();
            cx.event(EventKind::Respawn, e.id, e.id, 0);
        }
    }

    fn intent_target(intent: &DemoIntent) -> EntityId {
        match intent {
            DemoIntent::Attack { target, .. } => *target,
        }
    }

    fn apply_intent(
        &mut self,
        cx: &mut GameContext<'_>,
        target: &mut Entity<DemoComponents>,
        intent: &DemoIntent,
    ) {
        match *intent {
            DemoIntent::Attack {
                attacker,
                attacker_pos,
                damage,
                ..
            } => {
                if target.game.dead {
                    return;
                }
                // Slack for one tick of movement of both sides.
                let reach = self.config.attack_range + 2.0 * self.config.player_speed * cx.dt;
                if attacker_pos.distance_squared(target.pos) > reach * reach {
                    cx.counters.actions_rejected += 1;
                    return;
                }
                cx.counters.intents_applied += 1;
                target.game.health = target.game.health.saturating_sub(damage);
                cx.event(EventKind::Damage, attacker, target.id, i32::from(damage));
                if target.game.health == 0 {
                    target.game.dead = true;
                    target.vel = Vec2::default();
                    cx.event(EventKind::Death, attacker, target.id, 0);
                    cx.schedule(self.config.respawn_ticks, target.id, JOB_RESPAWN);
                }
            }
        }
    }

    fn stats(c: &DemoComponents) -> (u16, u8) {
        (c.health, if c.dead { STATE_DEAD } else { 0 })
    }

    // Fixed layout, little-endian: health u16, dead u8, cooldown u64,
    // wander flag u8 + x f32 + y f32, home x f32 + y f32, kills u32.
    fn encode_components(c: &DemoComponents, out: &mut Vec<u8>) {
        out.extend_from_slice(&c.health.to_le_bytes());
        out.push(u8::from(c.dead));
        out.extend_from_slice(&c.cooldown_until.to_le_bytes());
        let wander = c.wander_to.unwrap_or_default();
        out.push(u8::from(c.wander_to.is_some()));
        out.extend_from_slice(&wander.x.to_le_bytes());
        out.extend_from_slice(&wander.y.to_le_bytes());
        out.extend_from_slice(&c.home.x.to_le_bytes());
        out.extend_from_slice(&c.home.y.to_le_bytes());
        out.extend_from_slice(&c.kills.to_le_bytes());
    }

    fn decode_components(bytes: &[u8]) -> Option<DemoComponents> {
        let mut r = ByteReader::new(bytes);
        let health = r.u16()?;
        let dead = r.bool()?;
        let cooldown_until = r.u64()?;
        let has_wander = r.bool()?;
        let wander = Vec2::new(r.f32()?, r.f32()?);
        let home = Vec2::new(r.f32()?, r.f32()?);
        let kills = r.u32()?;
        r.is_empty().then_some(DemoComponents {
            health,
            dead,
            cooldown_until,
            wander_to: has_wander.then_some(wander),
            home,
            kills,
        })
    }

    // Tag 1 (attack): attacker u64, attacker x f32, y f32, target u64, damage u16.
    fn encode_intent(intent: &DemoIntent, out: &mut Vec<u8>) {
        match intent {
            DemoIntent::Attack {
                attacker,
                attacker_pos,
                target,
                damage,
            } => {
                out.push(1);
                out.extend_from_slice(&attacker.0.to_le_bytes());
                out.extend_from_slice(&attacker_pos.x.to_le_bytes());
                out.extend_from_slice(&attacker_pos.y.to_le_bytes());
                out.extend_from_slice(&target.0.to_le_bytes());
                out.extend_from_slice(&damage.to_le_bytes());
            }
        }
    }

    fn decode_intent(bytes: &[u8]) -> Option<DemoIntent> {
        let mut r = ByteReader::new(bytes);
        let intent = match r.u8()? {
            1 => DemoIntent::Attack {
                attacker: EntityId(r.u64()?),
                attacker_pos: Vec2::new(r.f32()?, r.f32()?),
                target: EntityId(r.u64()?),
                damage: r.u16()?,
            },
            _ => return None,
        };
        r.is_empty().then_some(intent)
    }
}
