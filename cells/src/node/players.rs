//! Players' avatars parked between two sessions. A connect token names its
//! player; when that player's session is lost (a timeout, a client gone
//! without saying it leaves) the gateway parks the avatar here instead of
//! removing it, and the player's next session, on any gateway shard that
//! shares the directory, takes it back rather than spawning a second one.
//! An avatar nobody takes back leaves by itself after the world's linger
//! time (its cell stops hearing from it), so entries older than that are
//! worthless and are dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::geometry::CellId;
use crate::ids::EntityId;

/// Where a player's avatar waits, and what takes it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParkedAvatar {
    /// The avatar.
    pub entity: EntityId,
    /// The cell that last sent the session a frame (a resume sent there
    /// follows the avatar if it moved on).
    pub cell: CellId,
    /// The avatar's resume credential.
    pub key: u64,
    /// The tick it was parked at.
    pub tick: u64,
}

/// Parked avatars by player id, shared by a node's gateway shards (one
/// lock, taken only when a session is lost or a player joins).
#[derive(Debug)]
pub struct PlayerDirectory {
    parked: Mutex<HashMap<u64, ParkedAvatar>>,
    /// Ticks after which a parked avatar is gone (the world's linger).
    max_age: u64,
    capacity: usize,
    evicted: AtomicU64,
}

impl PlayerDirectory {
    /// A directory whose avatars last `max_age` ticks, holding at most
    /// `capacity` (past it the oldest entry goes, counted).
    pub fn new(max_age: u64, capacity: usize) -> Self {
        Self {
            parked: Mutex::new(HashMap::new()),
            max_age,
            capacity: capacity.max(1),
            evicted: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ParkedAvatar>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks `player`'s avatar (replacing an older entry of the player).
    pub fn park(&self, player: u64, avatar: ParkedAvatar) {
        let mut parked = self.lock();
        if parked.len() >= self.capacity && !parked.contains_key(&player) {
            let max_age = self.max_age;
            parked.retain(|_, a| avatar.tick.saturating_sub(a.tick) <= max_age);
            if parked.len() >= self.capacity {
                if let Some(oldest) = parked.iter().min_by_key(|(_, a)| a.tick).map(|(p, _)| *p) {
                    parked.remove(&oldest);
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        parked.insert(player, avatar);
    }

    /// Takes `player`'s avatar if one is parked and still in the world at
    /// tick `now`.
    pub fn take(&self, player: u64, now: u64) -> Option<ParkedAvatar> {
        let avatar = self.lock().remove(&player)?;
        (now.saturating_sub(avatar.tick) < self.max_age).then_some(avatar)
    }

    /// Avatars parked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries dropped at the capacity bound before their time.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avatar(entity: u64, tick: u64) -> ParkedAvatar {
        ParkedAvatar {
            entity: EntityId(entity),
            cell: CellId::root(0, 0, 0),
            key: 7,
            tick,
        }
    }

    #[test]
    fn an_avatar_is_taken_once_and_only_while_it_lingers() {
        let d = PlayerDirectory::new(100, 8);
        d.park(1, avatar(10, 5));
        assert_eq!(d.take(2, 6), None, "another player's");
        assert_eq!(d.take(1, 6), Some(avatar(10, 5)));
        assert_eq!(d.take(1, 6), None, "taken once");
        d.park(1, avatar(11, 5));
        assert_eq!(d.take(1, 105), None, "it left the world at its linger time");
    }

    #[test]
    fn at_capacity_expired_entries_go_first_then_the_oldest() {
        let d = PlayerDirectory::new(100, 3);
        d.park(1, avatar(1, 0));
        d.park(2, avatar(2, 150));
        d.park(3, avatar(3, 160));
        d.park(4, avatar(4, 170));
        assert_eq!(d.len(), 3);
        assert_eq!(d.evicted(), 0, "player 1's had expired");
        d.park(5, avatar(5, 180));
        assert_eq!(d.evicted(), 1);
        assert_eq!(d.take(2, 180), None, "the oldest went");
        assert!(d.take(5, 180).is_some());
    }
}
