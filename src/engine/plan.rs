//! The plan stage: the views a plan reads, planning a scope, staging (plan now, apply later).

use super::*;

impl Synchronizer {

    pub(super) fn views_for(
        &self,
        scope: &PlanScope,
        now: DateTime<Utc>,
        bindings: &crate::delta::ContainerBindings,
    ) -> Result<Views> {
        match scope {
            PlanScope::All => self.store(|s| s.load_all()),
            PlanScope::Anchors(anchors) => {
                let mut views = self.store(|s| s.load_neighbourhood(anchors))?;
                // New objects may join target objects outside the neighbourhood: load the
                // candidates their join groups name.
                let ctx =
                    ProjectionContext::new(now, self.config.seed, &views.mirror, &views.target)
                        .with_containers(bindings);
                let mut lookups = Vec::new();
                for a in anchors {
                    if views.links.get(a).is_some() {
                        continue;
                    }
                    let Some(e) = views.mirror.get(a) else {
                        continue;
                    };
                    if let Projected::InScope(d) = self.projection.project(e, &ctx) {
                        for g in &d.join {
                            for (attr, value) in g.pairs() {
                                lookups.push(TargetLookup {
                                    object_type: d.target_type.clone(),
                                    attribute: attr.clone(),
                                    value: value.clone(),
                                });
                            }
                        }
                    }
                }
                if !lookups.is_empty() {
                    self.store(|s| s.load_join_candidates(&mut views, &lookups))?;
                }
                Ok(views)
            }
        }
    }

    pub(super) fn plan_scope(&self, scope: PlanScope) -> Result<(StagedPlan, Views)> {
        let t0 = Instant::now();
        let now = self.config.clock.now();
        let fingerprint = self.store(|s| s.fingerprint())?;
        let bindings = self.bind_containers()?;
        let views = self.views_for(&scope, now, &bindings)?;
        let delta_scope = matches!(scope, PlanScope::Anchors(_));
        let mut input = PlanInput::new(
            self.projection.as_ref(),
            &views.mirror,
            &views.links,
            &views.target,
        );
        input.scope = scope;
        input.now = now;
        input.seed = self.config.seed;
        input.guard = self.config.guard;
        input.containers = Some(&bindings);
        input.create_references = self.target.capabilities().create_references;
        let mut plan = delta::plan(&input);
        if delta_scope {
            // The neighbourhood's links are partial: count the linked objects in the store.
            let counts = self.store(|s| s.link_counts())?;
            plan.guard_violations = self
                .config
                .guard
                .check_with(&plan, |ty| counts.get(ty).copied().unwrap_or(0));
        }
        debug!(operations = plan.operations.len(), issues = plan.issues.len(), out_of_scope_references = plan.stats.out_of_scope_references, elapsed = ?t0.elapsed(), "planned");
        self.progress(
            Stage::Plan,
            plan.stats.considered as u64,
            Some(plan.stats.considered as u64),
        );
        Ok((
            StagedPlan {
                fingerprint,
                now,
                seed: self.config.seed,
                plan,
            },
            views,
        ))
    }

    /// Plans without applying ("staging"): every object (`full`) or the dirty set. The result
    /// serializes to JSON for review and carries the fingerprint of the state it came from.
    ///
    /// It reads the state only: creates the target mirror cannot answer for (see
    /// [`JoinLookup`]) are not looked up in the target — [`Synchronizer::apply`] looks them up
    /// and refuses the plan as stale if the target holds objects they would join. To review the
    /// plan a run would make, use [`Synchronizer::plan_with_lookups`].
    pub fn plan(&self, full: bool) -> Result<StagedPlan> {
        Ok(self.plan_scope(self.staging_scope(full)?)?.0)
    }

    /// Plans without applying, as a run would: first looks up in the target the join keys of
    /// the creates the target mirror cannot answer for (see [`JoinLookup`]), records what it
    /// finds in the target mirror, and plans joins for them instead.
    pub async fn plan_with_lookups(&self, full: bool) -> Result<StagedPlan> {
        let scope = self.staging_scope(full)?;
        let mut report = RunReport::default();
        Ok(self.plan_checked(scope, &mut report).await?.0)
    }

    pub(super) fn staging_scope(&self, full: bool) -> Result<PlanScope> {
        Ok(if full {
            PlanScope::All
        } else {
            PlanScope::Anchors(self.store(|s| s.dirty())?)
        })
    }

    /// Applies a saved plan: exactly its operations, or nothing if the state has moved since it
    /// was made.
    pub async fn apply(&mut self, staged: StagedPlan) -> Result<RunReport> {
        let current = self.store(|s| s.fingerprint())?;
        if current != staged.fingerprint {
            return Err(EngineError::StalePlan {
                planned: staged.fingerprint,
                current,
            });
        }
        let start = self.begin("apply")?;
        let run = start.run;
        let result = async {
            let mut looked_up = RunReport::default();
            self.check_staged_creates(&staged, &mut looked_up).await?;
            let anchors: Vec<Anchor> = staged
                .plan
                .operations
                .iter()
                .map(|o| o.anchor.clone())
                .collect();
            // The container bindings the plan was made with (recorded when it was made).
            let bindings = self.store(|s| s.container_bindings())?;
            let views = self.views_for(&PlanScope::Anchors(anchors), staged.now, &bindings)?;
            let plan =
                self.restore_secrets(staged.plan, &views, &bindings, staged.now, staged.seed);
            let mut report = self.export(run, plan, views).await?;
            report.absorb(looked_up);
            Ok(report)
        }
        .instrument(start.span())
        .await;
        self.finish(start, result)
    }

    /// A serialized plan carries no secret values: project the creates that had secrets again
    /// (same `now` and seed, so the same values) to fill them in.
    pub(super) fn restore_secrets(
        &self,
        mut plan: Plan,
        views: &Views,
        bindings: &crate::delta::ContainerBindings,
        now: DateTime<Utc>,
        seed: u64,
    ) -> Plan {
        let ctx = ProjectionContext::new(now, seed, &views.mirror, &views.target)
            .with_containers(bindings);
        for op in &mut plan.operations {
            if let OperationKind::Create { secrets, .. } = &mut op.kind {
                if secrets.is_empty() || secrets.iter().all(|(_, v)| !v.is_empty()) {
                    continue;
                }
                let Some(e) = views.mirror.get(&op.anchor) else {
                    continue;
                };
                if let Projected::InScope(d) = self.projection.project(e, &ctx) {
                    for f in d.flows.iter().filter(|f| f.redacted) {
                        if secrets.contains(f.attribute.as_str()) {
                            secrets.set(f.attribute.clone(), f.values.clone());
                        }
                    }
                }
            }
        }
        plan
    }

}
