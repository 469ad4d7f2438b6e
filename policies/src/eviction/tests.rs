//! The contract every eviction policy keeps, as one test body generic over any
//! [`EvictionPolicy`]. Every [`EvictionKind`] runs through it; a new policy
//! gets a variant and is checked here without writing a test of its own
//! (what makes it that policy, e.g. LRU's order, is tested beside it).

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::{EvictionKind, EvictionPolicy, LruPolicy};

#[derive(Debug, Clone)]
enum Op {
    Insert(u32),
    Touch(u32),
    Remove(u32),
    /// Pop a victim; slots with `slot % busy_mod == 0` are busy (0: none).
    Pop {
        busy_mod: u32,
    },
}

const SLOTS: u32 = 48;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SLOTS).prop_map(Op::Insert),
        3 => (0..SLOTS).prop_map(Op::Touch),
        2 => (0..SLOTS).prop_map(Op::Remove),
        3 => (0u32..4).prop_map(|busy_mod| Op::Pop { busy_mod }),
    ]
}

/// Random operations against the set of slots that must be tracked: a victim
/// is always a tracked, usable slot and is tracked no more; busy slots stay;
/// removed slots are never victims; touching an untracked slot does not track
/// it; `len` is the set's size; and draining returns every tracked slot once.
fn contract<P: EvictionPolicy + ?Sized>(name: &str, new: impl Fn() -> Box<P>) {
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 0..200), |ops| {
        let mut p = new();
        let mut tracked = BTreeSet::new();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                // The engine inserts only slots that are not tracked.
                Op::Insert(s) if !tracked.contains(&s) => {
                    p.insert(s);
                    tracked.insert(s);
                }
                Op::Insert(_) => {}
                Op::Touch(s) => p.touch(s),
                Op::Remove(s) => {
                    p.remove(s);
                    tracked.remove(&s);
                }
                Op::Pop { busy_mod } => {
                    let busy = |s: u32| busy_mod != 0 && s.is_multiple_of(busy_mod);
                    let any_usable = tracked.iter().any(|&s| !busy(s));
                    match p.pop_victim(&mut |s| !busy(s)) {
                        Some(v) => {
                            prop_assert!(
                                tracked.remove(&v),
                                "step {i}: victim {v} was not tracked"
                            );
                            prop_assert!(!busy(v), "step {i}: victim {v} was busy");
                        }
                        None => {
                            prop_assert!(!any_usable, "step {i}: no victim although one was usable")
                        }
                    }
                }
            }
            prop_assert_eq!(p.len(), tracked.len(), "step {}: len", i);
            prop_assert_eq!(p.is_empty(), tracked.is_empty());
        }
        let mut drained = BTreeSet::new();
        while let Some(v) = p.pop_victim(&mut |_| true) {
            prop_assert!(drained.insert(v), "victim {} twice", v);
        }
        prop_assert_eq!(drained, tracked);
        prop_assert!(p.is_empty());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name} breaks the eviction contract: {e}");
    }
}

#[test]
fn every_kind_keeps_the_contract() {
    for &kind in EvictionKind::ALL {
        contract(kind.as_str(), || {
            kind.builder().slots(SLOTS as usize).build()
        });
    }
}

#[test]
fn lru_keeps_the_contract_unboxed_too() {
    contract("LruPolicy", || Box::new(LruPolicy::new()));
}

#[test]
fn kinds_parse_print_and_serialize_by_name() {
    use serde::de::value::{Error, StrDeserializer};
    use serde::Deserialize;
    for &k in EvictionKind::ALL {
        assert_eq!(k.as_str().parse::<EvictionKind>(), Ok(k));
        assert_eq!(k.to_string(), k.as_str());
        let de = StrDeserializer::<Error>::new(k.as_str());
        assert_eq!(EvictionKind::deserialize(de), Ok(k));
    }
    assert_eq!(" LRU ".parse::<EvictionKind>(), Ok(EvictionKind::Lru));
    let e = "arc".parse::<EvictionKind>().unwrap_err().to_string();
    assert!(
        e.contains("unknown eviction policy 'arc'") && e.contains("lru"),
        "{e}"
    );
    assert_eq!(" Clock ".parse::<EvictionKind>(), Ok(EvictionKind::Clock));
    assert_eq!(EvictionKind::default(), EvictionKind::Clock);
}
