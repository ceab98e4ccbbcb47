//! Join lookups before creates ("never create what a join would find"): see [`JoinLookup`].
//! This file holds the engine's part (which creates need a lookup, batching, the rounds, the
//! record of whole target reads); each connector's part is its
//! [`Target::find_any`](crate::connector::Target::find_any).

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::{EngineError, Result, RunReport, Stage, StagedPlan, Synchronizer};
use crate::connector::{ConnectorError, Watermark};
use crate::delta::{JoinGroup, OperationKind, Plan, PlanScope};
use crate::model::{AttrName, ObjectType, TargetId, TargetObject, Value};
use crate::state::Views;

/// When the engine looks an object's join keys up in the target before creating it.
///
/// "Never create what a join would find": before the engine creates objects of a type whose target
/// mirror cannot answer for the target, it asks the target itself.
///
/// The planner joins an unlinked source object to a target object only if the *target mirror* holds
/// one that matches the object's join rules. The mirror learns the target from the engine's own
/// writes, from lookups and from reads
/// ([`Synchronizer::reconcile`](super::Synchronizer::reconcile)); a fresh state (a new deployment,
/// a lost state file, a migration from another tool) knows nothing, so without this step every
/// object would be planned as a create — duplicates wherever the target has no uniqueness rule to
/// refuse them (SCIM `Group.displayName`, RFC 7643 §4.2; LDAP entries named by another RDN; Graph
/// groups).
///
/// **When the mirror cannot answer.** The state remembers, per target object type, when the engine
/// last read every object of that type (a reconcile, or [`ReadTarget`](JoinLookup::ReadTarget)): a
/// watermark named `target-read:<target name>:<type>` holding the time. A type never read, or read
/// longer ago than [`EngineConfig::target_read_max_age`](super::EngineConfig), cannot answer "is
/// there already an object with this join key?": its creates are looked up first. Runs that create
/// nothing pay nothing; after a reconcile the lookups stop until the read goes stale (never, by
/// default).
///
/// **How, and what it costs.** [`Batched`](JoinLookup::Batched) (the default) takes every create of
/// the plan whose type cannot answer and looks up its join groups in the order the planner tries
/// them, one round per group: round 0 takes each create's first group — its first attribute and
/// value (a group of several attributes is looked up by its first; the planner checks the rest) —
/// removes repeated values, and asks the target for them in batches of
/// [`TargetCapabilities::lookup_batch`](crate::connector::TargetCapabilities) values with
/// [`Target::find_any`](crate::connector::Target::find_any): one LDAP search `(|(a=v1)(a=v2)…)` per
/// 100 values, one SCIM `a eq "v1" or a eq "v2" …` query per 50, one Graph `$filter=a in ('v1',…)`
/// per 15 (Graph's documented limit), memory and LDIF in one pass. What it finds goes into the
/// mirror and the plan is made again; round 1 looks up the second group of the creates still
/// planned, and so on. A first run of N creates costs about N / batch extra requests per join group
/// tried (Graph: 1 per 15 creates, against 1 write per create; against a target that already holds
/// everything, the first group finds it all), plus one read of the members of every group found
/// (SCIM, Graph); a later run costs one request per batch of new objects and group, as Entra
/// provisioning queries the target before each create (it queries one object per request).
/// [`ReadTarget`](JoinLookup::ReadTarget) instead reads every object of the type once, as Entra
/// Connect imports the target first: a paged read of the whole type (Graph: 1 request per 999
/// objects; SCIM: per page), cheaper when the run creates a large share of a target that holds
/// little else, and after it the type can answer until the read goes stale.
/// [`Off`](JoinLookup::Off) trusts the mirror (a target only this state ever wrote).
///
/// Objects found are recorded in the target mirror and the plan is made again: the planner then
/// joins them with its own rules — exactly one candidate per join group, several are a
/// [`JoinConflict`](crate::delta::Issue::JoinConflict) (reported, neither joined nor created), two
/// source objects on one target object a [`DuplicateJoin`](crate::delta::Issue::DuplicateJoin) —
/// and the join brings the object's attributes in line with the flows. A lookup the target refuses
/// fails the run before anything is written: the engine never creates blind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinLookup {
    /// Before creating objects of a type whose target mirror cannot answer (never read, or
    /// read longer ago than `target_read_max_age`), look their join keys up in the target, in
    /// batches; what is found is joined instead of created.
    #[default]
    Batched,
    /// Read every object of such a type into the target mirror once (as a reconcile reads it),
    /// then plan; the type then answers until the read goes stale.
    ReadTarget,
    /// Never look: the target mirror is trusted. Only for a target that holds nothing this
    /// state store did not create.
    Off,
}

/// The watermark name under which the state remembers when every object of `object_type` was
/// last read from `target`.
fn read_marker(target: &str, object_type: &ObjectType) -> String {
    format!("target-read:{target}:{object_type}")
}

const READ_MARKER_KIND: &str = "target-read";

/// One lookup request's worth: `values` of `attribute` among objects of `object_type`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LookupBatch {
    pub object_type: ObjectType,
    pub attribute: AttrName,
    pub values: Vec<Value>,
}

/// The lookups that the creates (target type and join groups) need in round `round`: the
/// first attribute of each create's join group number `round` (0-based) with its value,
/// grouped per target type and attribute, the values distinct (strings ignoring case, as joins
/// compare them; the first spelling kept) and in plan order, in batches of at most `batch`
/// values (at least 1). Creates with fewer groups need nothing in that round.
pub(crate) fn lookup_batches<'a>(
    creates: impl IntoIterator<Item = (&'a ObjectType, &'a [JoinGroup])>,
    round: usize,
    batch: usize,
) -> Vec<LookupBatch> {
    let mut keys: BTreeMap<(ObjectType, AttrName), (HashSet<Value>, Vec<Value>)> = BTreeMap::new();
    for (object_type, groups) in creates {
        let Some((attribute, value)) = groups.get(round).and_then(|g| g.pairs().first()) else {
            continue;
        };
        let (seen, values) = keys
            .entry((object_type.clone(), attribute.clone()))
            .or_default();
        if seen.insert(crate::state::lookup_key(value)) {
            values.push(value.clone());
        }
    }
    let batch = batch.max(1);
    let mut out = Vec::new();
    for ((object_type, attribute), (_, values)) in keys {
        for chunk in values.chunks(batch) {
            out.push(LookupBatch {
                object_type: object_type.clone(),
                attribute: attribute.clone(),
                values: chunk.to_vec(),
            });
        }
    }
    out
}

/// The creates of `plan`: their anchors' target types and join groups.
fn creates(plan: &Plan) -> impl Iterator<Item = (&ObjectType, &[JoinGroup])> {
    plan.operations.iter().filter_map(|op| match &op.kind {
        OperationKind::Create { lookup, .. } => Some((&op.target_type, lookup.as_slice())),
        _ => None,
    })
}

impl Synchronizer {
    /// Plans `scope` as [`Synchronizer::plan_scope`] does, after looking up in the target the
    /// creates the target mirror cannot answer for, one join group at a time as the planner
    /// tries them: round 0 looks up every create's first group; what it finds is recorded in
    /// the mirror and the plan is made again (joins instead of creates); round 1 looks up the
    /// second group of the creates left; and so on.
    pub(super) async fn plan_checked(
        &self,
        scope: PlanScope,
        report: &mut RunReport,
    ) -> Result<(StagedPlan, Views)> {
        self.plan_checked_with(scope, &super::plan::Together::whole(), report)
            .await
    }

    /// [`Synchronizer::plan_checked`] for a page of a paged run (see
    /// [`Synchronizer::plan_scope_with`]).
    pub(super) async fn plan_checked_with(
        &self,
        scope: PlanScope,
        together: &super::plan::Together,
        report: &mut RunReport,
    ) -> Result<(StagedPlan, Views)> {
        let (mut staged, mut views) = self.plan_scope_with(scope.clone(), together)?;
        let mut round = 0;
        while let Some(found) = self.look_up_creates(&staged.plan, round, report).await? {
            if found > 0 {
                (staged, views) = self.plan_scope_with(scope.clone(), together)?;
            }
            round += 1;
        }
        Ok((staged, views))
    }

    /// For [`Synchronizer::apply`]: looks up the staged plan's creates as a run would; when the
    /// target holds objects they would join (the plan made again for those objects creates
    /// fewer of them), the plan is stale.
    pub(super) async fn check_staged_creates(
        &self,
        staged: &StagedPlan,
        report: &mut RunReport,
    ) -> Result<()> {
        let mut found = 0;
        let mut round = 0;
        while let Some(n) = self.look_up_creates(&staged.plan, round, report).await? {
            found += n;
            round += 1;
        }
        if found == 0 {
            return Ok(());
        }
        let anchors: Vec<_> = staged
            .plan
            .operations
            .iter()
            .filter(|o| matches!(o.kind, OperationKind::Create { .. }))
            .map(|o| o.anchor.clone())
            .collect();
        let (again, _) = self.plan_scope(PlanScope::Anchors(anchors.clone()))?;
        let still: HashSet<_> = again
            .plan
            .operations
            .iter()
            .filter(|o| matches!(o.kind, OperationKind::Create { .. }))
            .map(|o| &o.anchor)
            .collect();
        if anchors.iter().all(|a| still.contains(a)) {
            return Ok(());
        }
        let current = self.store(|s| s.fingerprint())?;
        info!("the target already holds objects the saved plan would create: plan again");
        Err(EngineError::StalePlan {
            planned: staged.fingerprint,
            current,
        })
    }

    /// Whether the target mirror can answer for `object_type` at `now`: it was read whole,
    /// and not longer ago than the configured maximum age.
    fn mirror_answers(&self, object_type: &ObjectType, now: DateTime<Utc>) -> Result<bool> {
        let key = read_marker(self.target.name(), object_type);
        let Some(mark) = self.store(|s| s.watermark(&key))? else {
            return Ok(false);
        };
        let read_at = mark
            .as_text()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(match (read_at, self.config.target_read_max_age) {
            // A marker this build cannot read answers nothing.
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(max)) => chrono::Duration::from_std(max)
                .map(|max| now.signed_duration_since(at) <= max)
                .unwrap_or(true),
        })
    }

    /// Round `round` of the lookups of the creates of `plan` whose target type cannot answer
    /// (as the configured [`JoinLookup`] says): their join group number `round` is looked up
    /// (with [`JoinLookup::ReadTarget`], round 0 reads their types whole), and what is found is
    /// recorded in the target mirror. Returns the number of target objects found, or `None`
    /// when the round has nothing to look up (no later round has either).
    async fn look_up_creates(
        &self,
        plan: &Plan,
        round: usize,
        report: &mut RunReport,
    ) -> Result<Option<usize>> {
        let mode = self.config.join_lookup;
        if mode == JoinLookup::Off || (mode == JoinLookup::ReadTarget && round > 0) {
            return Ok(None);
        }
        if !creates(plan).any(|(_, groups)| groups.len() > round) {
            return Ok(None);
        }
        let caps = self.target.capabilities();
        if !caps.read {
            debug!("the target cannot be read: creates are not looked up");
            return Ok(None);
        }
        let now = self.config.clock.now();
        let mut blind: BTreeMap<ObjectType, bool> = BTreeMap::new();
        for (ty, _) in creates(plan) {
            if !blind.contains_key(ty) {
                let answers = self.mirror_answers(ty, now)?;
                blind.insert(ty.clone(), !answers);
            }
        }
        blind.retain(|_, b| *b);
        if blind.is_empty() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let found = match mode {
            JoinLookup::ReadTarget => {
                let mut n = 0;
                for ty in blind.keys() {
                    n += self.read_target_type(ty, report).await?.len();
                }
                n
            }
            _ => {
                let batches = lookup_batches(
                    creates(plan).filter(|(ty, _)| blind.contains_key(*ty)),
                    round,
                    caps.lookup_batch,
                );
                if batches.is_empty() {
                    // Only empty groups in this round: the next may have some.
                    return Ok(Some(0));
                }
                self.run_lookups(batches, report).await?
            }
        };
        report.stages.push((Stage::Reconcile, t0.elapsed()));
        Ok(Some(found))
    }

    /// Sends the lookups (as many at once as the export's concurrency), retrying retryable
    /// errors, and records every object found in the target mirror.
    async fn run_lookups(
        &self,
        batches: Vec<LookupBatch>,
        report: &mut RunReport,
    ) -> Result<usize> {
        let total = batches.len() as u64;
        let values: usize = batches.iter().map(|b| b.values.len()).sum();
        info!(
            requests = total,
            values, "looking up join keys in the target before creating"
        );
        let mut results = futures::stream::iter(batches.into_iter().map(|b| async move {
            let found = self.find_any_retrying(&b).await;
            (b, found)
        }))
        .buffer_unordered(self.config.concurrency.max(1));
        let mut seen: HashSet<TargetId> = HashSet::new();
        let mut found: Vec<TargetObject> = Vec::new();
        let mut done = 0u64;
        while let Some((b, outcome)) = results.next().await {
            let objects = outcome.map_err(|e| {
                EngineError::Connector(ConnectorError::new(
                    e.kind(),
                    format!(
                        "looking up {} {} value(s) of {} in the target before creating them: {}; \
                         nothing was created (set join_lookup = \"off\" to create without looking)",
                        b.values.len(),
                        b.attribute,
                        b.object_type,
                        e.message()
                    ),
                ))
            })?;
            report.looked_up += b.values.len() as u64;
            for o in objects {
                if seen.insert(o.id.clone()) {
                    found.push(o);
                }
            }
            done += 1;
            self.progress(Stage::Reconcile, done, Some(total));
        }
        drop(results);
        report.lookup_found += found.len() as u64;
        if !found.is_empty() {
            info!(
                found = found.len(),
                "the target already holds objects the plan would create: joined instead"
            );
            for chunk in found.chunks(500) {
                self.store(|s| s.put_target_objects(chunk))?;
            }
        }
        Ok(found.len())
    }

    /// One batch through [`Target::find_any`](crate::connector::Target::find_any), retrying
    /// retryable errors with the run's backoff (honouring `Retry-After`).
    async fn find_any_retrying(
        &self,
        b: &LookupBatch,
    ) -> std::result::Result<Vec<TargetObject>, ConnectorError> {
        let policy = self.config.retry;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self
                .target
                .find_any(&b.object_type, &b.attribute, &b.values)
                .await
            {
                Err(e) if e.is_retryable() && attempt < policy.max_attempts.max(1) => {
                    let backoff = policy
                        .base_delay
                        .saturating_mul(2u32.saturating_pow(attempt - 1));
                    let wait = e.retry_after().unwrap_or(backoff).min(policy.max_delay);
                    debug!(attempt, ?wait, error = %e, "lookup: retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    /// Reads every object of `object_type` from the target into the target mirror (in chunks
    /// of 500), counts them in `report.reconciled`, and records the read in the state: the
    /// type's mirror can answer for the target from now on. Returns the ids read.
    pub(super) async fn read_target_type(
        &self,
        object_type: &ObjectType,
        report: &mut RunReport,
    ) -> Result<HashSet<TargetId>> {
        let started = self.config.clock.now();
        let mut seen: HashSet<TargetId> = HashSet::new();
        let mut stream = self.target.read(object_type).await?;
        let mut batch: Vec<TargetObject> = Vec::new();
        while let Some(o) = stream.next().await {
            let o = o?;
            seen.insert(o.id.clone());
            batch.push(o);
            report.reconciled += 1;
            if batch.len() >= 500 {
                let b = std::mem::take(&mut batch);
                self.store(|st| st.put_target_objects(&b))?;
                self.progress(Stage::Reconcile, report.reconciled, None);
            }
        }
        drop(stream);
        self.store(|st| st.put_target_objects(&batch))?;
        // The read is complete as of its start: objects made during it may be missing.
        let mark = Watermark::new(READ_MARKER_KIND, started.to_rfc3339());
        let key = read_marker(self.target.name(), object_type);
        self.store(|st| st.apply_changes(&key, &[], Some(&mark)))?;
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(pairs: &[(&str, &str)]) -> Vec<JoinGroup> {
        pairs.iter().map(|(a, v)| JoinGroup::on(*a, *v)).collect()
    }

    #[test]
    fn batches_group_by_type_and_attribute_and_split_by_size() {
        let user = ObjectType::new("User");
        let group = ObjectType::new("Group");
        let plan: Vec<(ObjectType, Vec<JoinGroup>)> = (0..7)
            .map(|i| {
                (
                    user.clone(),
                    groups(&[
                        ("externalId", &format!("u{i}")),
                        ("userName", &format!("user{i}@x")),
                    ]),
                )
            })
            .chain([(group.clone(), groups(&[("displayName", "Staff")]))])
            .collect();
        let creates = || plan.iter().map(|(t, g)| (t, g.as_slice()));
        let shape = |b: &[LookupBatch]| -> Vec<(String, String, usize)> {
            b.iter()
                .map(|b| {
                    (
                        b.object_type.to_string(),
                        b.attribute.to_string(),
                        b.values.len(),
                    )
                })
                .collect()
        };
        let row = |t: &str, a: &str, n: usize| (t.to_string(), a.to_string(), n);
        // Round 0: every create's first group, per (type, attribute) in that order; 7 values
        // in batches of 3 → 3 + 3 + 1.
        let b = lookup_batches(creates(), 0, 3);
        assert_eq!(
            shape(&b),
            [
                row("Group", "displayName", 1),
                row("User", "externalId", 3),
                row("User", "externalId", 3),
                row("User", "externalId", 1),
            ]
        );
        // Values keep plan order inside a batch.
        assert_eq!(
            b[1].values,
            [
                Value::string("u0"),
                Value::string("u1"),
                Value::string("u2")
            ]
        );
        // Round 1: the second groups (the group type has none); round 2: nothing.
        assert_eq!(
            shape(&lookup_batches(creates(), 1, 5)),
            [row("User", "userName", 5), row("User", "userName", 2)]
        );
        assert!(lookup_batches(creates(), 2, 5).is_empty());
        // A batch size of 0 is taken as 1.
        assert_eq!(lookup_batches(creates(), 0, 0).len(), 8);
    }

    #[test]
    fn batches_look_up_each_value_once_and_a_group_by_its_first_attribute() {
        let ty = ObjectType::new("Group");
        let a = vec![JoinGroup::on("displayName", "Staff").and("description", "x")];
        let b = vec![JoinGroup::on("DISPLAYNAME", "STAFF")];
        let c = vec![JoinGroup::new(), JoinGroup::on("displayName", "Sales")];
        let creates = [
            (&ty, a.as_slice()),
            (&ty, b.as_slice()),
            (&ty, c.as_slice()),
        ];
        let batches = lookup_batches(creates, 0, 50);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].attribute.as_str(), "displayName");
        // "STAFF" is "Staff" ignoring case; c's first group is empty.
        assert_eq!(batches[0].values, [Value::string("Staff")]);
        let batches = lookup_batches(creates, 1, 50);
        assert_eq!(batches[0].values, [Value::string("Sales")]);
        assert!(lookup_batches(std::iter::empty(), 0, 10).is_empty());
    }

    #[test]
    fn read_markers_name_target_and_type() {
        assert_eq!(
            read_marker("scim", &ObjectType::new("Group")),
            "target-read:scim:Group"
        );
    }
}
