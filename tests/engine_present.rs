//! The engine's present phase (`ImportItem::Present`, RFC 4533 syncrepl): a delta whose
//! present set omits an object deletes it at the checkpoint, on both state stores; changed
//! objects count as present; a stream that ends before the checkpoint deletes nothing; a
//! present set too small for the import guard is refused. And a delta that modifies an object
//! the mirror does not hold falls back to a full import instead of failing the run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dirsync::connector::memory::MemoryTarget;
use dirsync::connector::{
    ConnectorError, ImportItem, ImportStream, Source, SourceCapabilities, Watermark,
};
use dirsync::engine::{EngineConfig, EngineError, Synchronizer};
use dirsync::model::{Anchor, AttributeChange, Change, Entry, Value};
use dirsync::rules::ruleset::{RuleBuilder, RuleSet};
use dirsync::state::{MemoryStore, SqliteStore, StateStore};
use futures::StreamExt;

/// A source replaying scripted imports.
#[derive(Clone, Default)]
struct Scripted {
    full: Arc<Mutex<Vec<ImportItem<Entry>>>>,
    delta: Arc<Mutex<Vec<ImportItem<Change>>>>,
}

#[async_trait]
impl Source for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::new(true)
    }
    async fn full_import(&self) -> Result<ImportStream<'_, Entry>, ConnectorError> {
        let items = self.full.lock().unwrap().clone();
        Ok(futures::stream::iter(items.into_iter().map(Ok)).boxed())
    }
    async fn delta_import(
        &self,
        _since: &Watermark,
    ) -> Result<ImportStream<'_, Change>, ConnectorError> {
        let items = self.delta.lock().unwrap().clone();
        Ok(futures::stream::iter(items.into_iter().map(Ok)).boxed())
    }
}

fn user(i: usize, sn: &str) -> Entry {
    Entry::new(format!("u{i}"), "user")
        .with("uid", format!("user{i}"))
        .with("sn", sn)
}

fn mark(n: u8) -> ImportItem<Change> {
    ImportItem::Checkpoint(Watermark::new("syncrepl", vec![n]))
}

fn rules() -> Arc<RuleSet> {
    Arc::new(
        RuleSet::builder()
            .rule(
                RuleBuilder::new("users", "user", "User")
                    .flow("userName", "[uid]")
                    .flow("surname", "[sn]")
                    .join(["userName"]),
            )
            .build()
            .unwrap(),
    )
}

fn setup(store: Box<dyn StateStore>) -> (Scripted, MemoryTarget, Synchronizer) {
    let src = Scripted::default();
    let mut full: Vec<ImportItem<Entry>> =
        (0..10).map(|i| ImportItem::Item(user(i, "A"))).collect();
    full.push(ImportItem::Checkpoint(Watermark::new("syncrepl", vec![0])));
    *src.full.lock().unwrap() = full;
    let target = MemoryTarget::new("app");
    let sync = Synchronizer::new(
        Box::new(src.clone()),
        Box::new(target.clone()),
        store,
        rules(),
        EngineConfig {
            guard: dirsync::delta::DeletionGuard::off(),
            ..EngineConfig::default()
        },
    );
    (src, target, sync)
}

fn names(t: &MemoryTarget) -> Vec<String> {
    let mut v: Vec<String> = t
        .objects()
        .into_iter()
        .filter_map(|o| o.attributes.first_str("userName").map(str::to_owned))
        .collect();
    v.sort();
    v
}

fn stores() -> Vec<Box<dyn StateStore>> {
    vec![
        Box::new(MemoryStore::new()),
        Box::new(SqliteStore::open_in_memory().unwrap()),
    ]
}

fn present(ids: impl IntoIterator<Item = usize>) -> ImportItem<Change> {
    ImportItem::Present(
        ids.into_iter()
            .map(|i| Anchor::new(format!("u{i}")))
            .collect(),
    )
}

#[tokio::test]
async fn a_present_phase_deletes_what_it_does_not_report() {
    for store in stores() {
        let (src, target, mut sync) = setup(store);
        sync.run_cycle().await.unwrap();
        assert_eq!(names(&target).len(), 10);
        // u1 changed (before the phase's first Present item), u2 added later in the phase,
        // u0 and u3..u8 present, u9 missing: deleted. u10 is new.
        *src.delta.lock().unwrap() = vec![
            ImportItem::Item(Change::Replace(user(1, "B"))),
            present([0, 3, 4, 5]),
            ImportItem::Item(Change::Replace(user(10, "A"))),
            present([6, 7, 8]),
            ImportItem::Item(Change::Replace(user(2, "C"))),
            mark(1),
        ];
        let r = sync.run_cycle().await.unwrap();
        let n = names(&target);
        assert!(!n.contains(&"user9".to_owned()), "{n:?} {r}");
        assert!(n.contains(&"user10".to_owned()), "{n:?}");
        assert_eq!(n.len(), 10, "{n:?}");
        let u1 = target
            .objects()
            .into_iter()
            .find(|o| o.attributes.first_str("userName") == Some("user1"))
            .unwrap();
        assert_eq!(u1.attributes.first_str("surname"), Some("B"));
        assert_eq!(
            sync.with_store(|s| s.watermark("scripted")).unwrap(),
            Some(Watermark::new("syncrepl", vec![1]))
        );
    }
}

#[tokio::test]
async fn a_phase_without_its_checkpoint_deletes_nothing_and_a_tiny_one_is_refused() {
    for store in stores() {
        let (src, target, mut sync) = setup(store);
        sync.run_cycle().await.unwrap();
        // The stream ends inside the phase: the change stays, nothing is deleted.
        *src.delta.lock().unwrap() = vec![
            present([0, 1]),
            ImportItem::Item(Change::Replace(user(2, "Z"))),
        ];
        sync.run_cycle().await.unwrap();
        assert_eq!(names(&target).len(), 10);
        assert_eq!(
            sync.with_store(|s| s.watermark("scripted")).unwrap(),
            Some(Watermark::new("syncrepl", vec![0]))
        );
        // Two of ten present: the import guard refuses, nothing is deleted, the watermark
        // stays.
        *src.delta.lock().unwrap() = vec![present([0, 1]), mark(2)];
        let e = sync.run_cycle().await.unwrap_err();
        assert!(matches!(e, EngineError::ImportTooSmall { .. }), "{e}");
        assert_eq!(names(&target).len(), 10);
        assert_eq!(
            sync.with_store(|s| s.watermark("scripted")).unwrap(),
            Some(Watermark::new("syncrepl", vec![0]))
        );
        // A present phase reporting everything deletes nothing and commits its watermark.
        *src.delta.lock().unwrap() = vec![present(0..10), mark(3)];
        sync.run_cycle().await.unwrap();
        assert_eq!(names(&target).len(), 10);
        assert_eq!(
            sync.with_store(|s| s.watermark("scripted")).unwrap(),
            Some(Watermark::new("syncrepl", vec![3]))
        );
    }
}

#[tokio::test]
async fn a_modify_of_an_unknown_object_falls_back_to_a_full_import() {
    for store in stores() {
        let (src, target, mut sync) = setup(store);
        sync.run_cycle().await.unwrap();
        // The source now modifies an object it never delivered, after a valid change; its full
        // import meanwhile holds u3 with a new surname and u11.
        *src.delta.lock().unwrap() = vec![
            ImportItem::Item(Change::Replace(user(1, "B"))),
            ImportItem::Item(Change::Modify {
                anchor: Anchor::new("u99"),
                object_type: "user".into(),
                changes: vec![AttributeChange::replace("sn", Value::from("X"))],
            }),
            mark(1),
        ];
        let mut full: Vec<ImportItem<Entry>> = (0..12)
            .filter(|i| *i != 10)
            .map(|i| ImportItem::Item(user(i, if i == 3 { "Z" } else { "A" })))
            .collect();
        full.push(ImportItem::Checkpoint(Watermark::new("syncrepl", vec![7])));
        *src.full.lock().unwrap() = full;
        let r = sync.run_cycle().await.unwrap();
        let n = names(&target);
        assert!(n.contains(&"user11".to_owned()), "{n:?} {r}");
        let surname = |uid: &str| {
            target
                .objects()
                .into_iter()
                .find(|o| o.attributes.first_str("userName") == Some(uid))
                .and_then(|o| o.attributes.first_str("surname").map(str::to_owned))
        };
        assert_eq!(surname("user3").as_deref(), Some("Z"), "{r}");
        // The full import's watermark is the one kept.
        *src.delta.lock().unwrap() = vec![mark(8)];
        sync.run_cycle().await.unwrap();
    }
}
