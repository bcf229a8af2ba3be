//! A coordinator with a cluster key links only with processes holding it:
//! a dial without a token is refused, one under another key is dropped
//! without a word, one under the key (current or previous) gets in.

use std::time::Duration;

use tessera_cells::Geometry;
use tessera_net::token::TokenKey;
use tessera_runtime::cluster::service::{CoordService, CoordServiceConfig};
use tessera_runtime::cluster::{ClusterKey, ControlLink};

fn key(byte: u8) -> ClusterKey {
    ClusterKey {
        keys: vec![TokenKey([byte; 32])],
    }
}

#[test]
fn only_holders_of_the_cluster_key_link_to_the_coordinator() {
    let service = CoordService::start(CoordServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: None,
        admin_token: None,
        geometry: Geometry::new(0, 128.0, 2, 2),
        tick_hz: 20,
        compute_nodes: 1,
        policy: tessera_coord::Policy::new(1),
        etcd: None,
        lease_follows_ttl: false,
        // Rotation: the current key and the previous one.
        cluster_key: Some(ClusterKey {
            keys: vec![TokenKey([1; 32]), TokenKey([2; 32])],
        }),
    })
    .unwrap();
    let at = service.listen_addr();
    let wait = Duration::from_millis(600);
    let refused = ControlLink::connect(at, wait, None)
        .err()
        .expect("no token: refused");
    assert!(refused.to_string().contains("TokenRequired"), "{refused}");
    assert!(
        ControlLink::connect(at, wait, Some(&key(9))).is_err(),
        "another cluster's key"
    );
    let mut link =
        ControlLink::connect(at, Duration::from_secs(5), Some(&key(1))).expect("the key");
    link.close();
    let mut link =
        ControlLink::connect(at, Duration::from_secs(5), Some(&key(2))).expect("the previous key");
    link.close();
    service
        .stop_flag()
        .store(true, std::sync::atomic::Ordering::Release);
    service.wait();
}
