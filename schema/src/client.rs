//! Client -> server messages: owned, validated forms and their encoding.

use flatbuffers::FlatBufferBuilder;

use crate::verify::{self, FrameError, FrameFamily};
use crate::wire;

/// Longest player name, in bytes.
pub const NAME_MAX_BYTES: usize = 32;
/// Longest join token, in bytes.
pub const TOKEN_MAX_BYTES: usize = 256;
/// Most actions in one input.
pub const ACTIONS_MAX: usize = 4;

/// An action the client asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActionCmd {
    /// Attack an entity.
    Attack {
        /// The target.
        target: u64,
    },
}

/// One input from a client, as the game logic sees it. The movement and
/// heading are raw: the game validates them (clamps and counts bad values).
#[derive(Clone, Debug, PartialEq)]
pub struct InputCmd {
    /// Client-chosen, increasing sequence number.
    pub input_seq: u32,
    /// The client's tick when it sampled the input.
    pub client_tick: u64,
    /// Desired movement direction; length 1 is full speed.
    pub movement: [f32; 2],
    /// Facing, radians.
    pub heading: f32,
    /// Requested actions.
    pub actions: Vec<ActionCmd>,
}

impl Default for InputCmd {
    fn default() -> Self {
        Self {
            input_seq: 0,
            client_tick: 0,
            movement: [0.0, 0.0],
            heading: 0.0,
            actions: Vec::new(),
        }
    }
}

/// Everything a client can say.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientMessage {
    /// Enter the world.
    Join {
        /// Display name (UTF-8, at most [`NAME_MAX_BYTES`]).
        name: String,
        /// Opaque authentication token (at most [`TOKEN_MAX_BYTES`]).
        token: Vec<u8>,
    },
    /// Player input.
    Input(InputCmd),
    /// Newest snapshot tick applied.
    Ack {
        /// The tick.
        snapshot_tick: u64,
    },
    /// Round-trip probe.
    Ping {
        /// Echoed back in the pong.
        client_time_us: u64,
    },
    /// Leaving the world.
    Leave {
        /// Reason code.
        reason: u8,
    },
    /// Take back an avatar hosted by a gateway that was lost (instead of a
    /// join): the server answers with a `Welcome` for the same entity, or
    /// an `Error` with `ResumeRefused` (then a fresh join is allowed).
    Resume {
        /// The avatar.
        entity: u64,
        /// The Welcome's `resume_key`.
        key: u64,
        /// Where the client last saw its avatar: the gateway asks the cell
        /// there first.
        position: [f32; 2],
    },
}

/// Reads and validates a client frame.
pub fn decode(bytes: &[u8]) -> Result<ClientMessage, FrameError> {
    let frame = verify::client_frame(bytes)?;
    let family = FrameFamily::Client;
    match frame.msg_type() {
        wire::ClientMsg::Join => {
            let join = frame
                .msg_as_join()
                .ok_or(FrameError::MissingMessage(family))?;
            let name = join.name().ok_or(FrameError::MissingField("name"))?;
            if name.len() > NAME_MAX_BYTES {
                return Err(FrameError::TooMany {
                    field: "name",
                    len: name.len(),
                    max: NAME_MAX_BYTES,
                });
            }
            if name.chars().any(char::is_control) {
                return Err(FrameError::BadValue("name"));
            }
            let token = join.token().map(|t| t.bytes().to_vec()).unwrap_or_default();
            if token.len() > TOKEN_MAX_BYTES {
                return Err(FrameError::TooMany {
                    field: "token",
                    len: token.len(),
                    max: TOKEN_MAX_BYTES,
                });
            }
            Ok(ClientMessage::Join {
                name: name.to_string(),
                token,
            })
        }
        wire::ClientMsg::Input => {
            let input = frame
                .msg_as_input()
                .ok_or(FrameError::MissingMessage(family))?;
            let mut actions = Vec::new();
            if let Some(list) = input.actions() {
                if list.len() > ACTIONS_MAX {
                    return Err(FrameError::TooMany {
                        field: "actions",
                        len: list.len(),
                        max: ACTIONS_MAX,
                    });
                }
                for a in list.iter() {
                    match a.kind() {
                        wire::ActionKind::None => {}
                        wire::ActionKind::Attack => {
                            actions.push(ActionCmd::Attack { target: a.target() })
                        }
                        _ => return Err(FrameError::BadValue("actions.kind")),
                    }
                }
            }
            let movement = input.movement().map_or([0.0, 0.0], |m| [m.x(), m.y()]);
            Ok(ClientMessage::Input(InputCmd {
                input_seq: input.input_seq(),
                client_tick: input.client_tick(),
                movement,
                heading: input.heading(),
                actions,
            }))
        }
        wire::ClientMsg::Ack => {
            let ack = frame
                .msg_as_ack()
                .ok_or(FrameError::MissingMessage(family))?;
            Ok(ClientMessage::Ack {
                snapshot_tick: ack.snapshot_tick(),
            })
        }
        wire::ClientMsg::Ping => {
            let ping = frame
                .msg_as_ping()
                .ok_or(FrameError::MissingMessage(family))?;
            Ok(ClientMessage::Ping {
                client_time_us: ping.client_time_us(),
            })
        }
        wire::ClientMsg::Leave => {
            let leave = frame
                .msg_as_leave()
                .ok_or(FrameError::MissingMessage(family))?;
            Ok(ClientMessage::Leave {
                reason: leave.reason(),
            })
        }
        wire::ClientMsg::Resume => {
            let r = frame
                .msg_as_resume()
                .ok_or(FrameError::MissingMessage(family))?;
            let p = r.position().ok_or(FrameError::MissingField("position"))?;
            Ok(ClientMessage::Resume {
                entity: r.entity(),
                key: r.key(),
                position: [
                    crate::quant::dequantize(p.x()),
                    crate::quant::dequantize(p.y()),
                ],
            })
        }
        wire::ClientMsg::NONE => Err(FrameError::MissingMessage(family)),
        other => Err(FrameError::UnknownMessage {
            family,
            tag: other.0,
        }),
    }
}

/// Encodes a client message into `fbb` and returns the frame bytes.
pub fn encode<'b>(fbb: &'b mut FlatBufferBuilder<'static>, msg: &ClientMessage) -> &'b [u8] {
    fbb.reset();
    let (msg_type, value) = match msg {
        ClientMessage::Join { name, token } => {
            let name = fbb.create_string(name);
            let token = (!token.is_empty()).then(|| fbb.create_vector(token));
            let join = wire::Join::create(
                fbb,
                &wire::JoinArgs {
                    name: Some(name),
                    token,
                },
            );
            (wire::ClientMsg::Join, join.as_union_value())
        }
        ClientMessage::Input(input) => {
            let actions: Vec<wire::Action> = input
                .actions
                .iter()
                .map(|a| match a {
                    ActionCmd::Attack { target } => {
                        wire::Action::new(*target, wire::ActionKind::Attack)
                    }
                })
                .collect();
            let actions = (!actions.is_empty()).then(|| fbb.create_vector(&actions));
            let movement = wire::MoveInput::new(input.movement[0], input.movement[1]);
            let i = wire::Input::create(
                fbb,
                &wire::InputArgs {
                    input_seq: input.input_seq,
                    client_tick: input.client_tick,
                    movement: Some(&movement),
                    heading: input.heading,
                    actions,
                },
            );
            (wire::ClientMsg::Input, i.as_union_value())
        }
        ClientMessage::Ack { snapshot_tick } => {
            let a = wire::Ack::create(
                fbb,
                &wire::AckArgs {
                    snapshot_tick: *snapshot_tick,
                },
            );
            (wire::ClientMsg::Ack, a.as_union_value())
        }
        ClientMessage::Ping { client_time_us } => {
            let p = wire::Ping::create(
                fbb,
                &wire::PingArgs {
                    client_time_us: *client_time_us,
                },
            );
            (wire::ClientMsg::Ping, p.as_union_value())
        }
        ClientMessage::Leave { reason } => {
            let l = wire::Leave::create(fbb, &wire::LeaveArgs { reason: *reason });
            (wire::ClientMsg::Leave, l.as_union_value())
        }
        ClientMessage::Resume {
            entity,
            key,
            position,
        } => {
            let position = crate::quant::qvec(position[0], position[1]);
            let r = wire::Resume::create(
                fbb,
                &wire::ResumeArgs {
                    entity: *entity,
                    key: *key,
                    position: Some(&position),
                },
            );
            (wire::ClientMsg::Resume, r.as_union_value())
        }
    };
    let frame = wire::ClientFrame::create(
        fbb,
        &wire::ClientFrameArgs {
            msg_type,
            msg: Some(value),
        },
    );
    fbb.finish_minimal(frame);
    fbb.finished_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(msg: &ClientMessage) -> ClientMessage {
        let mut fbb = FlatBufferBuilder::new();
        let bytes = encode(&mut fbb, msg).to_vec();
        decode(&bytes).expect("own encoding decodes")
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            ClientMessage::Join {
                name: "ada".into(),
                token: vec![1, 2, 3],
            },
            ClientMessage::Input(InputCmd {
                input_seq: 7,
                client_tick: 99,
                movement: [0.5, -1.0],
                heading: 1.25,
                actions: vec![ActionCmd::Attack { target: 42 }],
            }),
            ClientMessage::Ack {
                snapshot_tick: 1234,
            },
            ClientMessage::Ping { client_time_us: 5 },
            ClientMessage::Leave { reason: 2 },
            ClientMessage::Resume {
                entity: 77,
                key: u64::MAX - 3,
                position: [12.5, 300.25],
            },
        ];
        for m in &msgs {
            assert_eq!(&round_trip(m), m);
        }
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        assert!(matches!(decode(&[]), Err(FrameError::Invalid { .. })));
        assert!(matches!(
            decode(&[0u8; 2000]),
            Err(FrameError::TooLarge { .. })
        ));
        let long = ClientMessage::Join {
            name: "x".repeat(NAME_MAX_BYTES + 1),
            token: vec![],
        };
        let mut fbb = FlatBufferBuilder::new();
        let bytes = encode(&mut fbb, &long).to_vec();
        assert!(matches!(
            decode(&bytes),
            Err(FrameError::TooMany { field: "name", .. })
        ));
        let many = ClientMessage::Input(InputCmd {
            actions: vec![ActionCmd::Attack { target: 1 }; ACTIONS_MAX + 1],
            ..InputCmd::default()
        });
        let bytes = encode(&mut fbb, &many).to_vec();
        assert!(matches!(
            decode(&bytes),
            Err(FrameError::TooMany {
                field: "actions",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn corrupted_frames_never_panic(flip in 0usize..200, bit in 0u8..8, seq in any::<u32>()) {
            let mut fbb = FlatBufferBuilder::new();
            let msg = ClientMessage::Input(InputCmd {
                input_seq: seq,
                actions: vec![ActionCmd::Attack { target: 3 }],
                ..InputCmd::default()
            });
            let mut bytes = encode(&mut fbb, &msg).to_vec();
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            let _ = decode(&bytes);
        }

        #[test]
        fn inputs_round_trip(seq in any::<u32>(), tick in any::<u64>(), x in -2.0f32..2.0, y in -2.0f32..2.0,
                             targets in proptest::collection::vec(any::<u64>(), 0..=ACTIONS_MAX)) {
            let m = ClientMessage::Input(InputCmd {
                input_seq: seq,
                client_tick: tick,
                movement: [x, y],
                heading: x,
                actions: targets.into_iter().map(|target| ActionCmd::Attack { target }).collect(),
            });
            prop_assert_eq!(round_trip(&m), m);
        }
    }
}
