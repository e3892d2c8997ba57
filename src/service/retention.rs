//! Retention rules in use: the rule a push gets, the policy RPCs, the dry run, and applying
//! rules or settings to the artifacts live now.
//!
//! A policy set through any replica applies to the very next push everywhere. A push that
//! commits with a group (small, inline, on Postgres) takes its scope kind's rules from this
//! process's cache and carries their stamp into the group's statement, which commits it only
//! if the rules stored then have the same stamp (`store::push_batch`); otherwise the push
//! reads the rules again and retries. Every other push reads its rules from the database
//! (one primary-key range, usually empty). Either way the cache needs no invalidation: a
//! cached matcher is reused by a reading push exactly when the stored rules are equal to the
//! ones it was compiled from, and a stale one is caught at the grouped push's commit.
//!
//! [`Retention::policy_expired`] is the one computation of "live artifacts whose
//! policy-derived expiry has passed": the dry run counts it, applying the policy ends exactly
//! those now, and the sweeper may use it as it stands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::domain::metering::DAY_MICROS;
use crate::domain::retention::CompiledRules;
use crate::domain::{
    Clock, Error, Plan, ProjectId, RetentionPolicy, RetentionRule, ScopeKind, Timestamp,
};
use crate::service::Metering;
use crate::store::{LiveArtifact, RulesStamp, Store};

/// Artifacts read per page by a retention scan.
const SCAN_PAGE_ROWS: u64 = 1000;
/// Most compiled matchers kept; past it the cache starts over.
const COMPILED_ENTRIES: usize = 10_000;

/// Rules as a request gives them, before they are checked against the plan: per scope
/// kind, (selector, max age in microseconds; `None` when missing).
pub type RequestRules = [(ScopeKind, Vec<(String, Option<i64>)>); 3];

/// A live artifact whose first matching rule says it should have ended by now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyExpired {
    pub kind: ScopeKind,
    /// The rule's position in its kind's list.
    pub rule: usize,
    pub artifact: LiveArtifact,
}

/// One rule's dry-run figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleFigures {
    pub kind: ScopeKind,
    pub position: usize,
    pub rule: RetentionRule,
    pub artifacts: i64,
    pub bytes: i64,
}

/// Compiled matchers by (project, scope kind), each valid for the rules it holds, with their
/// stamp.
type CompiledCache = HashMap<(ProjectId, ScopeKind), (Arc<CompiledRules>, RulesStamp)>;

#[derive(Debug, Clone)]
pub struct Retention {
    store: Store,
    metering: Metering,
    clock: Arc<dyn Clock>,
    compiled: Arc<Mutex<CompiledCache>>,
}

impl Retention {
    pub fn new(store: Store, metering: Metering, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            metering,
            clock,
            compiled: Arc::default(),
        }
    }

    /// The maximum age the first of the project's `kind` rules matching `path` gives, as
    /// stored now; `None` when no rule matches.
    pub async fn rule_age(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
        path: &str,
    ) -> Result<Option<i64>, Error> {
        let rules = self.store.retention_rules(project, kind).await?;
        if rules.is_empty() {
            return Ok(None);
        }
        let (compiled, _) = self.compile(project, kind, rules)?;
        Ok(compiled
            .first_match(path)
            .map(|(_, rule)| rule.max_age_micros))
    }

    /// For a push whose commit checks the rules' stamp (see the module documentation): the
    /// maximum age the first of the project's `kind` rules matching `path` gives, from the
    /// cached rules (read from the database when none are cached, or with `reread`), and
    /// the stamp of the rules it came from.
    pub async fn rule_age_stamped(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
        path: &str,
        reread: bool,
    ) -> Result<(Option<i64>, RulesStamp), Error> {
        let cached = if reread {
            None
        } else {
            self.compiled
                .lock()
                .ok()
                .and_then(|cache| cache.get(&(project.clone(), kind)).cloned())
        };
        let (compiled, stamp) = match cached {
            Some(entry) => entry,
            None => {
                let rules = self.store.retention_rules(project, kind).await?;
                self.compile(project, kind, rules)?
            }
        };
        let age = compiled
            .first_match(path)
            .map(|(_, rule)| rule.max_age_micros);
        Ok((age, stamp))
    }

    /// A matcher for `rules` and their stamp: the cached one if it was compiled from equal
    /// rules.
    fn compile(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
        rules: Vec<RetentionRule>,
    ) -> Result<(Arc<CompiledRules>, RulesStamp), Error> {
        let key = (project.clone(), kind);
        if let Ok(cache) = self.compiled.lock()
            && let Some(entry) = cache.get(&key)
            && entry.0.rules() == rules.as_slice()
        {
            return Ok(entry.clone());
        }
        let stamp = RulesStamp::of(&rules);
        let entry = (Arc::new(CompiledRules::compile(rules)?), stamp);
        if let Ok(mut cache) = self.compiled.lock() {
            if cache.len() >= COMPILED_ENTRIES {
                cache.clear();
            }
            cache.insert(key, entry.clone());
        }
        Ok(entry)
    }

    pub async fn policy(&self, project: &ProjectId) -> Result<RetentionPolicy, Error> {
        // NOT_FOUND for a project never seen, like its usage controls.
        self.metering.project(project).await?;
        self.store.retention_policy(project).await
    }

    /// Replaces the project's policy, each rule checked against its plan (`field` names
    /// the request field, e.g. `policy.job_rules`). With `apply_to_existing`, the artifacts
    /// live now that a rule selects get their expiry from it (see [`Retention::apply_rules`]).
    /// Returns the stored policy and how many artifacts changed.
    pub async fn set_policy(
        &self,
        project: &ProjectId,
        rules: RequestRules,
        apply_to_existing: bool,
    ) -> Result<(RetentionPolicy, u64), Error> {
        // A write: the project is created on the default plan if new, as for its controls.
        let record = self.metering.project_for_push(project).await?;
        let policy = parse_policy(rules, &record.plan)?;
        let now = self.clock.now();
        self.store
            .set_retention_policy(project, &policy, now)
            .await?;
        let mut changed = 0;
        if apply_to_existing {
            changed = self
                .apply_rules(project, &policy, &record.plan, now)
                .await?;
            self.metering.forget(project).await;
        }
        tracing::info!(
            project = %project,
            rules = ScopeKind::ALL.iter().map(|&k| policy.rules(k).len()).sum::<usize>(),
            apply_to_existing,
            changed,
            "retention policy set"
        );
        Ok((policy, changed))
    }

    /// Per rule of `rules` (else of the stored policy), what it would end now. Ends nothing.
    pub async fn dry_run(
        &self,
        project: &ProjectId,
        rules: Option<RequestRules>,
    ) -> Result<(Timestamp, Vec<RuleFigures>), Error> {
        let record = self.metering.project(project).await?;
        let policy = match rules {
            Some(rules) => parse_policy(rules, &record.plan)?,
            None => self.store.retention_policy(project).await?,
        };
        let now = self.clock.now();
        let mut figures: Vec<RuleFigures> = ScopeKind::ALL
            .iter()
            .flat_map(|&kind| {
                policy
                    .rules(kind)
                    .iter()
                    .enumerate()
                    .map(move |(position, rule)| RuleFigures {
                        kind,
                        position,
                        rule: rule.clone(),
                        artifacts: 0,
                        bytes: 0,
                    })
            })
            .collect();
        let mut expired = self.policy_expired(project, &policy, &record.plan, now)?;
        while let Some(page) = expired.next_page().await? {
            for one in page {
                if let Some(f) = figures
                    .iter_mut()
                    .find(|f| f.kind == one.kind && f.position == one.rule)
                {
                    f.artifacts += 1;
                    f.bytes = f.bytes.saturating_add(one.artifact.size);
                }
            }
        }
        Ok((now, figures))
    }

    /// The artifacts live and unpinned at `now` whose policy-derived expiry is at or before
    /// `now`, a page at a time: the first rule of `policy` matching their path gives a
    /// maximum age (bounded by `plan`'s maximum retention) that has passed since their
    /// creation. What [`Retention::apply_rules`] ends at `now`, exactly.
    pub fn policy_expired<'a>(
        &'a self,
        project: &'a ProjectId,
        policy: &RetentionPolicy,
        plan: &Plan,
        now: Timestamp,
    ) -> Result<PolicyExpiredPages<'a>, Error> {
        Ok(PolicyExpiredPages {
            scans: self.scans(project, policy, now)?,
            max_age: i64::from(plan.max_retention_days) * DAY_MICROS,
            now,
        })
    }

    /// Gives the artifacts live and unpinned at `now` that a rule of `policy` selects the
    /// expiry that rule gives: `created_at + max_age` (bounded by the plan's maximum), never
    /// before `now`. Artifacts no rule selects keep theirs. Returns how many changed.
    pub async fn apply_rules(
        &self,
        project: &ProjectId,
        policy: &RetentionPolicy,
        plan: &Plan,
        now: Timestamp,
    ) -> Result<u64, Error> {
        let max = i64::from(plan.max_retention_days) * DAY_MICROS;
        let mut changed = 0;
        for mut scan in self.scans(project, policy, now)? {
            while let Some(page) = scan.next_page().await? {
                // One statement per distinct age on the page.
                let mut by_age: HashMap<i64, Vec<i64>> = HashMap::new();
                for (artifact, rule) in page {
                    if let Some(rule) = rule {
                        by_age
                            .entry(scan.rules.rules()[rule].max_age_micros.min(max))
                            .or_default()
                            .push(artifact.id);
                    }
                }
                for (ttl, ids) in by_age {
                    changed += self.store.set_lifetime(&ids, ttl, now).await?;
                }
            }
        }
        Ok(changed)
    }

    /// Applies the project's retention setting for `kind` (`days`) to the artifacts live
    /// and unpinned at `now` that no rule of the project's policy selects: for those a rule
    /// selects, the rule wins. Without rules, one statement.
    pub async fn apply_setting(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
        days: i32,
        now: Timestamp,
    ) -> Result<u64, Error> {
        let rules = self.store.retention_rules(project, kind).await?;
        if rules.is_empty() {
            return self
                .store
                .recompute_expirations(project, kind, days, now)
                .await;
        }
        let ttl = i64::from(days) * DAY_MICROS;
        let mut scan = Scan::new(
            self,
            project,
            kind,
            self.compile(project, kind, rules)?.0,
            now,
        );
        let mut changed = 0;
        while let Some(page) = scan.next_page().await? {
            let ids: Vec<i64> = page
                .into_iter()
                .filter(|(_, rule)| rule.is_none())
                .map(|(artifact, _)| artifact.id)
                .collect();
            changed += self.store.set_lifetime(&ids, ttl, now).await?;
        }
        Ok(changed)
    }

    /// One scan per scope kind that has rules in `policy`.
    fn scans<'a>(
        &'a self,
        project: &'a ProjectId,
        policy: &RetentionPolicy,
        now: Timestamp,
    ) -> Result<Vec<Scan<'a>>, Error> {
        ScopeKind::ALL
            .into_iter()
            .filter(|&kind| !policy.rules(kind).is_empty())
            .map(|kind| {
                let (rules, _) = self.compile(project, kind, policy.rules(kind).to_vec())?;
                Ok(Scan::new(self, project, kind, rules, now))
            })
            .collect()
    }
}

/// Pages of [`PolicyExpired`] artifacts, kind after kind (see [`Retention::policy_expired`]).
pub struct PolicyExpiredPages<'a> {
    scans: Vec<Scan<'a>>,
    max_age: i64,
    now: Timestamp,
}

impl PolicyExpiredPages<'_> {
    /// The next non-empty page, or `None` when the scan is over.
    pub async fn next_page(&mut self) -> Result<Option<Vec<PolicyExpired>>, Error> {
        while let Some(scan) = self.scans.first_mut() {
            let Some(page) = scan.next_page().await? else {
                self.scans.remove(0);
                continue;
            };
            let expired: Vec<PolicyExpired> = page
                .into_iter()
                .filter_map(|(artifact, rule)| {
                    let rule = rule?;
                    let age = scan.rules.rules()[rule].max_age_micros.min(self.max_age);
                    (artifact.created_at.saturating_add_micros(age) <= self.now).then_some(
                        PolicyExpired {
                            kind: scan.kind,
                            rule,
                            artifact,
                        },
                    )
                })
                .collect();
            if !expired.is_empty() {
                return Ok(Some(expired));
            }
        }
        Ok(None)
    }
}

/// Pages through a project's artifacts of one kind live and unpinned at `now`, each with the
/// position of the first rule matching its path.
struct Scan<'a> {
    store: &'a Store,
    project: &'a ProjectId,
    kind: ScopeKind,
    rules: Arc<CompiledRules>,
    now: Timestamp,
    /// The last `(scope_id, path)` read; `None` before the first page.
    after: Option<(String, String)>,
    done: bool,
}

impl<'a> Scan<'a> {
    fn new(
        retention: &'a Retention,
        project: &'a ProjectId,
        kind: ScopeKind,
        rules: Arc<CompiledRules>,
        now: Timestamp,
    ) -> Self {
        Self {
            store: &retention.store,
            project,
            kind,
            rules,
            now,
            after: None,
            done: false,
        }
    }

    async fn next_page(&mut self) -> Result<Option<Vec<(LiveArtifact, Option<usize>)>>, Error> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .store
            .live_unpinned_page(
                self.project,
                self.kind,
                self.after.as_ref().map(|(s, p)| (s.as_str(), p.as_str())),
                SCAN_PAGE_ROWS,
                self.now,
            )
            .await?;
        self.done = (page.len() as u64) < SCAN_PAGE_ROWS;
        let Some(last) = page.last() else {
            return Ok(None);
        };
        self.after = Some((last.scope_id.clone(), last.path.clone()));
        Ok(Some(
            page.into_iter()
                .map(|artifact| {
                    let rule = self.rules.first_match(&artifact.path).map(|(i, _)| i);
                    (artifact, rule)
                })
                .collect(),
        ))
    }
}

/// A request's rules, per kind, checked against the plan: INVALID_ARGUMENT naming
/// `policy.<kind>_rules[i]` and the limit.
fn parse_policy(rules: RequestRules, plan: &Plan) -> Result<RetentionPolicy, Error> {
    let mut policy = RetentionPolicy::default();
    for (kind, list) in rules {
        *policy.rules_mut(kind) =
            RetentionPolicy::parse_rules(&format!("policy.{}_rules", kind.as_str()), list, plan)?;
    }
    Ok(policy)
}
