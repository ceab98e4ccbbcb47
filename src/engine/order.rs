//! The export order within a phase: [`ordered`] runs a phase's operations with bounded
//! concurrency, starting a create only once the creates it references
//! ([`Reference::Pending`] values in its attributes) have finished — succeeded, so the reference
//! resolves to the new object's id, or failed, so the create goes without it (see
//! [`Operation::without_unresolved`]) and the object stays dirty for a later write.
//!
//! Per-operation dependencies, not a barrier per level: a report is sent as soon as its manager
//! exists, while other managers are still being created.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::{join, ready, Join, Ready};
use futures::stream::{FuturesUnordered, Stream};

use crate::delta::{Operation, OperationKind};
use crate::model::{Anchor, Reference, Value};

/// For each operation, the indices (in `ops`) of the creates it must wait for: the creates of
/// the anchors its create attributes reference as [`Reference::Pending`]. Other operations wait
/// for nothing.
pub(super) fn dependencies(ops: &[Operation]) -> Vec<Vec<usize>> {
    let creates: HashMap<&Anchor, usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o.kind, OperationKind::Create { .. }))
        .map(|(i, o)| (&o.anchor, i))
        .collect();
    ops.iter()
        .enumerate()
        .map(|(i, op)| {
            let OperationKind::Create { attributes, .. } = &op.kind else {
                return Vec::new();
            };
            let mut deps: Vec<usize> = attributes
                .iter()
                .flat_map(|(_, values)| values.iter())
                .filter_map(|v| match v {
                    Value::Reference(Reference::Pending(a)) => creates.get(a).copied(),
                    _ => None,
                })
                .filter(|d| *d != i)
                .collect();
            deps.sort_unstable();
            deps.dedup();
            deps
        })
        .collect()
}

/// Runs `start(op)` for every operation of `ops`, at most `concurrency` at once, each only after
/// the operations it depends on ([`dependencies`]) have finished; yields the outputs as they
/// finish. Among the operations free to start, the earliest in `ops` (plan order) starts first.
///
/// Dependencies a plan could not produce (a cycle among creates, from a plan edited by hand)
/// never stall it: when nothing runs and nothing is free, the earliest waiting operation starts,
/// and its unresolved references are left out.
pub(super) fn ordered<F, Fut>(ops: Vec<Operation>, concurrency: usize, start: F) -> Ordered<F, Fut>
where
    F: FnMut(Operation) -> Fut,
    Fut: Future,
{
    let deps = dependencies(&ops);
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); ops.len()];
    let mut waiting: Vec<usize> = Vec::with_capacity(ops.len());
    let mut free = BTreeSet::new();
    for (i, d) in deps.iter().enumerate() {
        for &j in d {
            dependents[j].push(i);
        }
        waiting.push(d.len());
        if d.is_empty() {
            free.insert(i);
        }
    }
    Ordered {
        ops: ops.into_iter().map(Some).collect(),
        waiting,
        dependents,
        free,
        running: FuturesUnordered::new(),
        start,
        concurrency: concurrency.max(1),
    }
}

/// The stream [`ordered`] returns.
pub(super) struct Ordered<F, Fut: Future> {
    /// The operations not started yet.
    ops: Vec<Option<Operation>>,
    /// How many unfinished operations each one still waits for.
    waiting: Vec<usize>,
    /// For each operation, those that wait for it.
    dependents: Vec<Vec<usize>>,
    /// Operations free to start, by index.
    free: BTreeSet<usize>,
    running: FuturesUnordered<Join<Ready<usize>, Fut>>,
    start: F,
    concurrency: usize,
}

impl<F, Fut> Ordered<F, Fut>
where
    F: FnMut(Operation) -> Fut,
    Fut: Future,
{
    /// Starts free operations up to the concurrency; when nothing runs and nothing is free but
    /// operations are left, frees the earliest.
    fn fill(&mut self) {
        if self.running.is_empty() && self.free.is_empty() {
            if let Some(i) = self.ops.iter().position(Option::is_some) {
                self.free.insert(i);
            }
        }
        while self.running.len() < self.concurrency {
            let Some(i) = self.free.pop_first() else {
                break;
            };
            if let Some(op) = self.ops[i].take() {
                self.running.push(join(ready(i), (self.start)(op)));
            }
        }
    }
}

impl<F, Fut> Stream for Ordered<F, Fut>
where
    F: FnMut(Operation) -> Fut + Unpin,
    Fut: Future,
{
    type Item = Fut::Output;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.fill();
        match Pin::new(&mut this.running).poll_next(cx) {
            Poll::Ready(Some((i, out))) => {
                for d in std::mem::take(&mut this.dependents[i]) {
                    this.waiting[d] = this.waiting[d].saturating_sub(1);
                    if this.waiting[d] == 0 && this.ops[d].is_some() {
                        this.free.insert(d);
                    }
                }
                Poll::Ready(Some(out))
            }
            // Nothing runs: `fill` started something unless every operation has started.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::Reason;
    use crate::model::{Attributes, Values};
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};

    fn create(anchor: &str, refs: &[&str]) -> Operation {
        let mut attributes = Attributes::new();
        if !refs.is_empty() {
            attributes.set(
                "member",
                refs.iter()
                    .map(|r| Value::Reference(Reference::Pending(Anchor::new(*r))))
                    .collect::<Values>(),
            );
        }
        Operation {
            anchor: Anchor::new(anchor),
            source_type: "group".into(),
            target_type: "Group".into(),
            kind: OperationKind::Create {
                attributes,
                secrets: Attributes::new(),
                lookup: Vec::new(),
            },
            reason: Reason::EnteredScope,
        }
    }

    /// Runs `ops` with `concurrency`, each operation yielding to the executor once while it
    /// runs; returns the events in order: `+anchor` when it starts, `-anchor` when it ends.
    fn run(ops: Vec<Operation>, concurrency: usize) -> Vec<String> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let ended: Vec<()> = futures::executor::block_on(
            ordered(ops, concurrency, move |op| {
                l.lock().unwrap().push(format!("+{}", op.anchor));
                let l = l.clone();
                async move {
                    let mut yielded = false;
                    futures::future::poll_fn(|cx| {
                        if yielded {
                            Poll::Ready(())
                        } else {
                            yielded = true;
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        }
                    })
                    .await;
                    l.lock().unwrap().push(format!("-{}", op.anchor));
                }
            })
            .collect(),
        );
        let log = log.lock().unwrap().clone();
        assert_eq!(ended.len() * 2, log.len());
        log
    }

    fn at(log: &[String], event: &str) -> usize {
        log.iter().position(|e| e == event).unwrap()
    }

    #[test]
    fn a_create_starts_after_the_creates_it_references() {
        // Plan order: the leaves, then the group of both, then the outer group.
        let ops = vec![
            create("u1", &[]),
            create("u2", &[]),
            create("g1", &["u1", "u2", "gone"]),
            create("g2", &["g1"]),
            create("u3", &[]),
        ];
        assert_eq!(
            dependencies(&ops),
            [vec![], vec![], vec![0, 1], vec![2], vec![]]
        );
        for concurrency in [1, 2, 8] {
            let log = run(ops.clone(), concurrency);
            assert_eq!(log.len(), 10, "{log:?}");
            assert!(
                at(&log, "+g1") > at(&log, "-u1").max(at(&log, "-u2")),
                "{log:?}"
            );
            assert!(at(&log, "+g2") > at(&log, "-g1"), "{log:?}");
            if concurrency == 8 {
                // What waits for nothing starts at once.
                assert_eq!(&log[..3], ["+u1", "+u2", "+u3"], "{log:?}");
            }
        }
    }

    #[test]
    fn a_cycle_in_a_hand_made_plan_does_not_stall() {
        let ops = vec![create("a", &["b"]), create("b", &["a"]), create("c", &[])];
        let log = run(ops, 4);
        let started: Vec<&String> = log.iter().filter(|e| e.starts_with('+')).collect();
        assert_eq!(started, ["+c", "+a", "+b"], "{log:?}");
    }
}
