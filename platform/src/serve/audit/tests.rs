use bridge_protocol::AuditAt;

use super::*;

const AGENT: &str = "5f2b0c7e4b8a9d1e3f6a7c8b9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f7a8b9c0";

/// A hash that differs for each `(n, chain)`.
fn h(n: u64, chain: u8) -> String {
    format!("{:02x}{:062x}", chain, n)
}

fn head(seq: u64, chain: u8) -> AuditHead {
    AuditHead {
        seq,
        hash: h(seq, chain),
        at: None,
    }
}

fn head_at(seq: u64, chain: u8, at: u64, at_hash: Option<String>) -> AuditHead {
    AuditHead {
        at: Some(AuditAt {
            seq: at,
            hash: at_hash,
        }),
        ..head(seq, chain)
    }
}

/// The state after taking `heads` in order (judging none).
fn state_of(heads: &[AuditHead]) -> AuditState {
    let mut state = AuditState::default();
    for head in heads {
        state.take(head);
    }
    state
}

fn kind(stored: &AuditState, head: &AuditHead) -> Option<FlagKind> {
    judge(stored, head).map(|(kind, _, _)| kind)
}

#[test]
fn a_chain_that_grows_is_never_flagged() {
    let mut state = AuditState::default();
    assert_eq!(kind(&state, &head(0, 0)), None);
    state.take(&head(0, 0));
    for seq in 1..200 {
        let answered = head_at(seq, 0, seq - 1, Some(h(seq - 1, 0)));
        assert_eq!(kind(&state, &answered), None, "seq {seq}");
        state.take(&answered);
        // The same head again (no task since the last status) is fine too.
        assert_eq!(kind(&state, &head(seq, 0)), None);
    }
    assert_eq!(state.history.len(), HISTORY);
    assert_eq!(state.history.first().unwrap().seq, 199 - HISTORY as u64 + 1);
    assert_eq!(
        state.latest,
        Some(SeqHash {
            seq: 199,
            hash: h(199, 0)
        })
    );
}

#[test]
fn a_lower_seq_is_backwards() {
    let state = state_of(&[head(5, 0), head(9, 0)]);
    let (kind, seq, detail) = judge(&state, &head(7, 0)).unwrap();
    assert_eq!((kind, seq), (FlagKind::Backwards, 7));
    assert!(
        detail.contains("seq 7") && detail.contains("seq 9"),
        "{detail}"
    );
}

#[test]
fn a_different_hash_at_a_stored_seq_is_a_fork() {
    let state = state_of(&[head(5, 0), head(9, 0)]);
    // The head at the same seq.
    assert_eq!(
        judge(&state, &head(9, 1)).map(|(k, s, _)| (k, s)),
        Some((FlagKind::Fork, 9))
    );
    // The answer to `audit_seq`, with the chain grown since.
    assert_eq!(
        judge(&state, &head_at(12, 1, 5, Some(h(5, 1)))).map(|(k, s, _)| (k, s)),
        Some((FlagKind::Fork, 5))
    );
    // A seq the platform never stored cannot fork.
    assert_eq!(kind(&state, &head_at(12, 1, 7, Some(h(7, 1)))), None);
}

#[test]
fn a_record_the_agent_no_longer_has_is_unverifiable() {
    let state = state_of(&[head(9, 0)]);
    assert_eq!(
        judge(&state, &head_at(12, 0, 9, None)).map(|(k, s, _)| (k, s)),
        Some((FlagKind::Unverifiable, 9))
    );
    // Seq 0 names no record: there is nothing to verify.
    assert_eq!(kind(&state, &head_at(12, 0, 0, None)), None);
}

#[test]
fn the_history_follows_the_chain_reported_now() {
    let mut state = state_of(&[head(3, 0), head(5, 0), head(9, 0)]);
    // Rewritten from seq 4 on and shorter: the pairs past the head go, the head's replaces.
    state.take(&head(4, 1));
    assert_eq!(
        state.history,
        vec![
            SeqHash {
                seq: 3,
                hash: h(3, 0)
            },
            SeqHash {
                seq: 4,
                hash: h(4, 1)
            }
        ]
    );
    // So the new chain, growing, is not flagged again.
    assert_eq!(kind(&state, &head_at(9, 1, 4, Some(h(4, 1)))), None);
}

#[test]
fn the_first_flag_sticks_until_cleared_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = AuditStore::open(dir.path()).unwrap();
    assert_eq!(store.view(AGENT).unwrap(), None);
    assert_eq!(store.audit_seq(AGENT), None);
    assert_eq!(store.observe(AGENT, &head(0, 0)).unwrap(), None);
    assert_eq!(store.audit_seq(AGENT), None, "seq 0 names no record");
    assert_eq!(store.observe(AGENT, &head(9, 0)).unwrap(), None);
    assert_eq!(store.audit_seq(AGENT), Some(9));

    let raised = store.observe(AGENT, &head(7, 0)).unwrap().unwrap();
    assert_eq!(raised.kind, FlagKind::Backwards);
    // A later fork updates the head, not the flag.
    assert_eq!(store.observe(AGENT, &head(7, 1)).unwrap(), None);
    let view = store.view(AGENT).unwrap().unwrap();
    assert_eq!((view.seq, view.hash.as_str()), (7, h(7, 1).as_str()));
    assert_eq!(view.flag.as_ref().unwrap().kind, FlagKind::Backwards);

    let reopened = AuditStore::open(dir.path()).unwrap();
    assert_eq!(reopened.view(AGENT).unwrap(), Some(view.clone()));
    assert_eq!(reopened.clear(AGENT).unwrap(), view.flag);
    assert_eq!(reopened.clear(AGENT).unwrap(), None);
    assert_eq!(reopened.view(AGENT).unwrap().unwrap().flag, None);
    let mode = fs::metadata(dir.path().join(AUDIT_DIR).join(format!("{AGENT}.json")))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_hostile_or_corrupt_file_is_an_error_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = AuditStore::open(dir.path()).unwrap();
    let path = dir.path().join(AUDIT_DIR).join(format!("{AGENT}.json"));
    let too_long: Vec<SeqHash> = (1..=HISTORY as u64 + 1)
        .map(|seq| SeqHash {
            seq,
            hash: h(seq, 0),
        })
        .collect();
    let unordered = vec![
        SeqHash {
            seq: 2,
            hash: h(2, 0),
        },
        SeqHash {
            seq: 1,
            hash: h(1, 0),
        },
    ];
    let bad_hash = vec![SeqHash {
        seq: 1,
        hash: "0A".repeat(32),
    }];
    let cases: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        br#"{"latest":null,"history":[],"flag":null,"extra":1}"#.to_vec(),
        serde_json::to_vec(&AuditState {
            history: too_long,
            ..Default::default()
        })
        .unwrap(),
        serde_json::to_vec(&AuditState {
            history: unordered,
            ..Default::default()
        })
        .unwrap(),
        serde_json::to_vec(&AuditState {
            history: bad_hash,
            ..Default::default()
        })
        .unwrap(),
        // Past the read bound, whatever it holds.
        vec![b' '; MAX_FILE_BYTES as usize + 1],
    ];
    for bytes in cases {
        fs::write(&path, &bytes).unwrap();
        assert!(store.get(AGENT).is_err());
        assert!(store.view(AGENT).is_err());
        assert!(store.observe(AGENT, &head(1, 0)).is_err());
        assert!(store.clear(AGENT).is_err());
        assert_eq!(store.audit_seq(AGENT), None);
        assert_eq!(fs::read(&path).unwrap(), bytes, "left as it was");
    }
    // Exactly at the bound: read (and, being blank, not a state).
    fs::write(&path, vec![b' '; MAX_FILE_BYTES as usize]).unwrap();
    let err = format!("{:#}", store.get(AGENT).unwrap_err());
    assert!(err.contains("not an audit state"), "{err}");
    // Only agent ids name files.
    for bad in ["../x", "", &AGENT.to_uppercase(), &AGENT[..63]] {
        assert!(store.get(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_full_state_fits_the_read_bound() {
    let mut state = state_of(&(1..=HISTORY as u64).map(|s| head(s, 0)).collect::<Vec<_>>());
    state.flag = Some(Flag {
        kind: FlagKind::Fork,
        detail: "é".repeat(MAX_DETAIL_BYTES / 2),
        seq: u64::MAX,
        flagged_at: "2026-12-04T01:00:00Z".into(),
    });
    let text = serde_json::to_vec_pretty(&state).unwrap();
    assert!((text.len() as u64) < MAX_FILE_BYTES, "{}", text.len());
}
