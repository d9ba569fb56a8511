//! The session on virtual time against a model gateway: the guarantees under any interleaving
//! (property tests), and each bad input's defined outcome.

extern crate std;

use std::vec;
use std::vec::Vec;

use proptest::prelude::*;
use wasmbed_protocol::{ErrorBody, ErrorCode, Frame, Goaway, Kind, Resumed, Welcome};

use crate::{Action, Cause, Config, SendError, Session, Status, Violation};

use crate::model::{Op, World, ticket};

fn config() -> Config<'static> {
    let mut c = Config::new("device-0001", "counter");
    c.window = 1024;
    c.max_frame = 512;
    c.max_ticket = 64;
    c.seed = 7;
    c
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Send),
        4 => (1usize..64).prop_map(Op::ToGateway),
        4 => (1usize..64).prop_map(Op::ToDevice),
        1 => Just(Op::Drop),
        1 => any::<bool>().prop_map(Op::Goaway),
        1 => (0u64..3000).prop_map(Op::Tick),
        1 => any::<bool>().prop_map(Op::RefuseTickets),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    /// Any interleaving of sends, partial reads and writes, drops, GOAWAYs, timeouts and
    /// refused tickets: every DATA gets exactly one answer event, in order; with every
    /// ticket taken, the app's state holds every DATA exactly once; nothing is lost.
    #[test]
    fn every_data_is_answered_once_in_order(
        ops in proptest::collection::vec(op(), 0..200),
        every in 1u64..6,
        small in any::<bool>(),
    ) {
        // A small window (4 DATA) makes room by evicting answered DATA (and the ticket).
        let mut c = config();
        if small {
            c.window = 4 * 14;
        }
        let mut w = World::new(&c, every);
        for op in ops {
            w.apply(op);
        }
        w.finish();
    }

    /// Whatever a peer sends, the session never panics, keeps to its memory, and ends the
    /// connection with a defined cause when the bytes break the protocol.
    #[test]
    fn arbitrary_bytes_from_the_peer(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..20)) {
        let mut w = World::new(&config(), 1);
        w.service();
        w.deliver_up(usize::MAX);
        for c in chunks {
            w.peer_bytes(&c);
        }
        prop_assert!(matches!(w.s.status(), Status::Connected | Status::Close));
    }
}

/// A connected world whose session is open (WELCOME read).
fn open_world(every: u64) -> World {
    let mut w = World::new(&config(), every);
    w.service();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.app.welcomes, 1);
    w
}

/// Feeds frames as if from the gateway.
fn feed(w: &mut World, frames: &[Frame]) {
    for f in frames {
        let bytes = f.encode();
        let mut rest = &bytes[..];
        while !rest.is_empty() && w.s.status() == Status::Connected {
            let took = w.s.feed(rest, w.now);
            rest = &rest[took..];
            w.events();
        }
    }
}

fn violation(w: &mut World) -> Option<Violation> {
    w.service();
    match w.app.disconnects.last() {
        Some(Cause::Violation(v)) => Some(*v),
        _ => None,
    }
}

#[test]
fn a_resume_resends_only_what_the_ticket_does_not_cover() {
    let mut w = open_world(2);
    for _ in 0..5 {
        w.send();
    }
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    // Checkpoints after 2 and 4: DATA 5 is answered, not covered.
    assert_eq!(w.s.ticket().map(|t| t.0), Some(4));
    w.drop_connection();
    w.settle();
    w.service();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.app.welcomes, 2);
    assert_eq!(w.s.stats().resent, 1, "DATA 5 again, for its effect");
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.s.stats().replays, 1, "its second answer dropped");
    assert_eq!(w.app.replies, 5);
}

#[test]
fn garbage_and_oversized_frames_end_the_connection_with_their_code() {
    let mut w = open_world(1);
    feed(&mut w, &[Frame::new(Kind::Reply, 1, vec![0; 600])]);
    assert_eq!(
        violation(&mut w),
        Some(Violation::Frame(ErrorCode::FrameTooLarge))
    );
    let mut w = open_world(1);
    let _ = w.s.feed(&[0, 0, 0, 20, 99], 0);
    w.events();
    assert_eq!(
        violation(&mut w),
        Some(Violation::Frame(ErrorCode::UnknownType))
    );
    let mut w = open_world(1);
    feed(
        &mut w,
        &[Frame::new(Kind::Checkpoint, 0, b"not cbor".to_vec())],
    );
    assert_eq!(violation(&mut w), Some(Violation::Body));
    let mut w = open_world(1);
    feed(&mut w, &[Frame::new(Kind::Data, 1, vec![])]);
    assert_eq!(
        violation(&mut w),
        Some(Violation::Unexpected(Kind::Data as u8))
    );
}

#[test]
fn a_resume_that_does_not_fit_what_was_sent_is_refused() {
    let mut w = open_world(1);
    w.send();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    w.drop_connection();
    w.service();
    w.deliver_up(usize::MAX);
    // The gateway claims DATA 9 (never sent) is covered.
    w.gw = None;
    let welcome = Welcome {
        session: "s".into(),
        gateway: "g".into(),
        resumed: Some(Resumed {
            seq: 9,
            state: "restored".into(),
        }),
        resume_refused: None,
    };
    feed(&mut w, &[Frame::control(Kind::Welcome, 0, &welcome)]);
    assert_eq!(violation(&mut w), Some(Violation::Resume));
    assert!(w.s.ticket().is_none(), "the next session starts fresh");
}

#[test]
fn answers_for_data_never_sent_and_stale_checkpoints_are_dropped() {
    let mut w = open_world(1);
    w.send();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.s.ticket().map(|t| t.0), Some(1));
    let stale = wasmbed_protocol::Checkpoint {
        ticket: serde_bytes::ByteBuf::from(ticket(0, 0)),
    };
    feed(
        &mut w,
        &[
            Frame::new(Kind::Reply, 7, vec![]),
            Frame::control(Kind::Checkpoint, 0, &stale),
            Frame::control(Kind::Checkpoint, 5, &stale),
        ],
    );
    let st = w.s.stats();
    assert_eq!(
        (
            st.unsent_answers,
            st.unsent_checkpoints,
            st.stale_checkpoints
        ),
        (1, 1, 1)
    );
    assert_eq!(w.s.ticket().map(|t| t.0), Some(1));
    assert_eq!(w.s.status(), Status::Connected);
}

#[test]
fn a_skipped_answer_is_reported_lost_in_order() {
    let mut w = open_world(100);
    w.send();
    w.send();
    w.deliver_up(usize::MAX);
    if let Some(g) = w.gw.as_mut() {
        g.out.clear();
    }
    feed(&mut w, &[Frame::new(Kind::Reply, 2, 2u64.to_le_bytes())]);
    assert_eq!((w.app.answered, w.app.lost, w.app.replies), (2, 1, 1));
}

#[test]
fn goaway_split_mid_frame_stops_sending_and_leaves_once_answered() {
    let mut w = open_world(1);
    w.send();
    w.send();
    // DATA 1 whole and 5 bytes of DATA 2 reach the gateway.
    w.deliver_up(14 + 5);
    let goaway = Frame::control(Kind::Goaway, 0, &Goaway { reason: "d".into() }).encode();
    let (a, b) = goaway.split_at(7);
    assert_eq!(w.s.feed(a, 0), a.len());
    w.events();
    assert_eq!(
        w.s.status(),
        Status::Connected,
        "half a GOAWAY is nothing yet"
    );
    assert_eq!(w.s.feed(b, 0), b.len());
    w.events();
    assert!(
        w.s.poll_send().is_empty(),
        "nothing goes after GOAWAY, not even the rest of DATA 2"
    );
    assert_eq!(
        w.s.status(),
        Status::Connected,
        "the answer to DATA 1 is owed"
    );
    w.deliver_down(usize::MAX);
    assert_eq!(w.s.status(), Status::Close, "answered: it leaves by itself");
    w.service();
    assert_eq!(w.app.disconnects.last(), Some(&Cause::Goaway));
    assert_eq!(w.s.status(), Status::Connect, "a GOAWAY reconnects at once");
    w.settle();
    assert_eq!(w.app.answered, 2);
}

#[test]
fn goaway_before_welcome_backs_off() {
    let mut w = World::new(&config(), 1);
    w.service();
    w.deliver_up(usize::MAX);
    if let Some(g) = w.gw.as_mut() {
        g.out.clear();
    }
    feed(
        &mut w,
        &[Frame::control(
            Kind::Goaway,
            0,
            &Goaway { reason: "d".into() },
        )],
    );
    w.service();
    assert_eq!(w.app.disconnects, vec![Cause::Goaway]);
    assert_eq!(w.s.status(), Status::Wait, "nothing was welcomed: back off");
}

#[test]
fn a_resume_beyond_what_was_written_and_answers_for_unsent_data_are_refused() {
    let mut w = open_world(1);
    w.send();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    // DATA 2 and 3 queued, never written.
    w.send();
    w.send();
    feed(&mut w, &[Frame::new(Kind::Reply, 3, 3u64.to_le_bytes())]);
    assert_eq!(w.s.stats().unsent_answers, 1);
    assert_eq!(
        (w.app.answered, w.app.lost),
        (1, 0),
        "DATA 2 is not lost for it"
    );
    w.drop_connection();
    w.service();
    w.deliver_up(usize::MAX);
    w.gw = None;
    let welcome = Welcome {
        session: "s".into(),
        gateway: "g".into(),
        resumed: Some(Resumed {
            seq: 3,
            state: "restored".into(),
        }),
        resume_refused: None,
    };
    feed(&mut w, &[Frame::control(Kind::Welcome, 0, &welcome)]);
    assert_eq!(
        violation(&mut w),
        Some(Violation::Resume),
        "DATA 3 was never written"
    );
    assert_eq!(w.app.covered, 0);
}

#[test]
fn an_answer_twice_across_connections_is_a_duplicate_not_a_replay() {
    let mut w = open_world(1000);
    w.send();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    w.drop_connection();
    w.settle();
    w.service();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    // No ticket: a new session; DATA 1 was answered, so it is not sent again.
    assert_eq!(w.s.stats().resent, 0);
    feed(&mut w, &[Frame::new(Kind::Reply, 1, 1u64.to_le_bytes())]);
    assert_eq!((w.s.stats().duplicates, w.s.stats().replays), (1, 0));
}

#[test]
fn a_silent_peer_is_left_and_backoff_grows_with_jitter() {
    let mut w = World::new(&config(), 1);
    w.service();
    w.deliver_up(usize::MAX);
    if let Some(g) = w.gw.as_mut() {
        g.out.clear();
    }
    w.tick(config().answer_timeout_ms);
    w.service();
    assert_eq!(w.app.disconnects, vec![Cause::Silent]);
    let mut waits = vec![];
    for _ in 0..12 {
        let until = w.s.poll_timeout().expect("backing off");
        waits.push(until - w.now);
        w.tick(until - w.now);
        assert_eq!(w.s.status(), Status::Connect);
        w.s.closed(w.now);
    }
    let c = config();
    for (i, wait) in waits.iter().enumerate() {
        let base = (c.first_backoff_ms << i).min(c.max_backoff_ms);
        assert!(
            *wait >= base && *wait <= base + base / 2,
            "{i}: {wait} vs {base}"
        );
    }
    assert!(
        waits.windows(2).any(|p| p[1] != 2 * p[0]),
        "jittered: {waits:?}"
    );
}

#[test]
fn keepalive_pings_and_a_dead_peer_is_left() {
    let mut w = open_world(1);
    let ka = config().keepalive_ms;
    w.tick(ka);
    assert_eq!(w.s.poll_send().len(), 13, "a PING");
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    w.tick(ka - 1);
    assert_eq!(w.s.status(), Status::Connected, "the PONG kept it");
    if let Some(g) = w.gw.as_mut() {
        g.closing = true;
    }
    w.tick(1);
    w.deliver_up(usize::MAX);
    w.tick(ka);
    w.service();
    assert_eq!(w.app.disconnects, vec![Cause::Silent]);
}

#[test]
fn each_session_error_has_its_action() {
    for (code, action, status) in [
        (ErrorCode::UnknownApp, Action::GiveUp, Status::Done),
        (ErrorCode::Revoked, Action::GiveUp, Status::Done),
        (ErrorCode::TooManyTraps, Action::Fresh, Status::Wait),
        (ErrorCode::Unavailable, Action::Retry, Status::Wait),
    ] {
        let mut w = open_world(1);
        w.send();
        w.deliver_up(usize::MAX);
        w.deliver_down(usize::MAX);
        w.send();
        feed(&mut w, &[code.frame(0, "no")]);
        w.service();
        assert_eq!(
            w.app.disconnects,
            vec![Cause::Refused {
                code: code as u16,
                action
            }]
        );
        assert_eq!(w.s.status(), status, "{code:?}");
        assert_eq!(w.s.ticket().is_some(), action != Action::Fresh, "{code:?}");
        if action == Action::GiveUp {
            assert_eq!(w.app.lost, 1, "DATA 2 reported lost");
            assert_eq!(w.s.send_data(b"x"), Err(SendError::Done));
        }
    }
    let body = ErrorBody {
        code: 999,
        text: "new".into(),
    };
    assert_eq!(Action::of(body.code), Action::Retry);
}

#[test]
fn a_full_window_pushes_back_and_memory_is_what_the_config_says() {
    let mut c = config();
    c.window = 3 * 14;
    let mut w = World::new(&c, 1000);
    w.service();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    for _ in 0..3 {
        w.send();
    }
    assert_eq!(w.s.send_data(b"x"), Err(SendError::WindowFull));
    assert_eq!(w.s.send_data(&[0; 64]), Err(SendError::TooLarge));
    // Answered and written, no ticket: the oldest answered DATA makes room.
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    assert_eq!(w.s.send_data(b"x"), Ok(4));
    assert_eq!(w.s.stats().evictions, 1);
    let need = Session::<Vec<u8>>::memory(&c);
    assert_eq!(
        Session::new(&c, vec![0u8; need - 1]).err(),
        Some(crate::SetupError::Memory {
            needed: need,
            given: need - 1
        })
    );
}

#[test]
fn a_ticket_kept_across_a_reboot_resumes() {
    let mut w = open_world(1);
    w.send();
    w.send();
    w.deliver_up(usize::MAX);
    w.deliver_down(usize::MAX);
    let (seq, t) =
        w.s.ticket()
            .map(|(s, t)| (s, t.to_vec()))
            .expect("a ticket");
    // Reboot: a new session from the stored ticket.
    let mut r = World::new(&config(), 1);
    assert!(r.s.restore(seq, &t));
    assert_eq!(r.s.next_seq(), 3);
    r.sent = 2;
    r.app.answered = 2;
    r.send();
    r.settle();
    assert_eq!(r.app.replies, 1);
    // The gateway's count went on from the ticket's: the state came back.
    assert!(!r.app.fresh_after_first);
}

#[test]
fn data_a_refused_ticket_covered_but_never_answered_is_lost() {
    let mut w = open_world(1000);
    w.send();
    w.send();
    w.deliver_up(usize::MAX);
    if let Some(g) = w.gw.as_mut() {
        g.out.clear();
    }
    // A CHECKPOINT covering DATA 1 and 2 before their answers (out of order).
    let c = wasmbed_protocol::Checkpoint {
        ticket: serde_bytes::ByteBuf::from(ticket(2, 2)),
    };
    feed(&mut w, &[Frame::control(Kind::Checkpoint, 2, &c)]);
    w.drop_connection();
    w.refuse_tickets = true;
    w.settle();
    assert_eq!((w.app.answered, w.app.lost), (2, 2), "{:?}", w.app);
}

/// Keep-alive counts frames, not bytes: a peer that trickles a frame it never finishes, a
/// byte now and then, gets the PING, and is left when that goes unanswered.
#[test]
fn a_peer_that_trickles_a_frame_it_never_finishes_is_left() {
    let mut w = open_world(1);
    if let Some(g) = w.gw.as_mut() {
        g.closing = true;
    }
    let ka = config().keepalive_ms;
    let frame = Frame::new(Kind::Push, 1, vec![0; 200]).encode();
    // One byte every keep-alive's tenth, for three keep-alives: never the whole frame.
    for byte in frame.iter().take(30) {
        w.tick(ka / 10);
        w.s.feed(std::slice::from_ref(byte), w.now);
        w.events();
        w.service();
        if w.s.status() != Status::Connected {
            break;
        }
    }
    assert_eq!(w.app.disconnects, vec![Cause::Silent]);
}

/// A ticket is restored before any connection only, and one longer than a frame (so no
/// CHECKPOINT could have brought it) is refused rather than overrun the memory it goes
/// through.
#[test]
fn a_ticket_is_restored_before_any_connection_and_only_if_a_frame_could_carry_it() {
    let mut c = config();
    c.max_ticket = 2048; // over max_frame (512)
    let mut w = World::new(&c, 1);
    assert!(!w.s.restore(5, &[7; 600]), "longer than a frame");
    assert!(w.s.restore(5, &[7; 500]), "one a frame could carry");
    let mut w = open_world(1);
    w.drop_connection();
    w.settle();
    assert!(!w.s.restore(9, &[7; 10]), "after a connection was made");
    assert_eq!(w.s.next_seq(), 1);
}

/// A config `Session::new` refuses needs no memory: `memory` says none is enough.
#[test]
fn a_refused_config_needs_no_memory() {
    let mut empty = config();
    empty.device = "";
    let mut small = config();
    small.window = 3;
    for c in [empty, small] {
        assert_eq!(Session::<Vec<u8>>::memory(&c), usize::MAX);
        assert!(Session::new(&c, vec![0u8; 1 << 16]).is_err());
    }
}
