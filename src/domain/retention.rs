//! How long an artifact lives: retention rules (Semaphore's retention policies) and the one
//! resolution of an artifact's lifetime at push.
//!
//! A project's policy holds, per scope kind, an ordered list of `(selector, max age)`. The
//! selector is a glob over the artifact's path within its scope: `*` and `?` stay within one
//! folder, `**` crosses folders (`logs/**` is everything under `logs/`, `**/*.xml` every XML
//! file at any depth), `{a,b}` and `[abc]` as usual. The first rule whose selector matches
//! gives the artifact's maximum age. A leading `/`, as Semaphore writes selectors
//! (`/logs/**`), is accepted and means the same as without it.
//!
//! An artifact's lifetime, from its creation ([`resolve_lifetime`]): the push's `expire_in`,
//! else the first matching rule of its scope kind, else the project's retention setting for
//! the kind, else the plan's maximum — never more than the plan's maximum.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use super::error::{Error, Result};
use super::metering::DAY_MICROS;
use super::plan::{Plan, UsageControls};
use super::scope::ScopeKind;

/// Most rules per scope kind: a policy is read on every push without `expire_in`, and
/// matched against every path.
pub const MAX_RULES_PER_KIND: usize = 100;
/// Longest selector, in bytes (as long as the longest path).
pub const MAX_SELECTOR_BYTES: usize = 1024;

/// One rule: artifacts whose path `selector` matches live at most `max_age_micros`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RetentionRule {
    /// As stored: validated, without a leading `/`.
    pub selector: String,
    pub max_age_micros: i64,
}

/// A project's retention rules, per scope kind, in the order they are tried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub job: Vec<RetentionRule>,
    pub workflow: Vec<RetentionRule>,
    pub project: Vec<RetentionRule>,
}

impl RetentionPolicy {
    pub fn rules(&self, kind: ScopeKind) -> &[RetentionRule] {
        match kind {
            ScopeKind::Job => &self.job,
            ScopeKind::Workflow => &self.workflow,
            ScopeKind::Project => &self.project,
        }
    }

    pub fn rules_mut(&mut self, kind: ScopeKind) -> &mut Vec<RetentionRule> {
        match kind {
            ScopeKind::Job => &mut self.job,
            ScopeKind::Workflow => &mut self.workflow,
            ScopeKind::Project => &mut self.project,
        }
    }

    pub fn is_empty(&self) -> bool {
        ScopeKind::ALL
            .iter()
            .all(|&kind| self.rules(kind).is_empty())
    }

    /// Parses rules as a request sends them (`field` is e.g. `policy.job_rules`): each
    /// selector must be a glob, each age positive and within the plan's maximum retention,
    /// and at most [`MAX_RULES_PER_KIND`] per kind. INVALID_ARGUMENT names the rule's field
    /// and the limit.
    pub fn parse_rules(
        field: &str,
        rules: impl IntoIterator<Item = (String, Option<i64>)>,
        plan: &Plan,
    ) -> Result<Vec<RetentionRule>> {
        let max_age = i64::from(plan.max_retention_days) * DAY_MICROS;
        let mut parsed = Vec::new();
        for (i, (selector, age)) in rules.into_iter().enumerate() {
            if i == MAX_RULES_PER_KIND {
                return Err(Error::invalid(
                    field,
                    format!("more than {MAX_RULES_PER_KIND} rules"),
                ));
            }
            let selector = parse_selector(&format!("{field}[{i}].selector"), &selector)?;
            let age_field = format!("{field}[{i}].max_age");
            let max_age_micros = match age {
                None => return Err(Error::invalid(age_field, "is required")),
                Some(age) if age <= 0 => return Err(Error::invalid(age_field, "must be positive")),
                Some(age) if age > max_age => {
                    return Err(Error::invalid(
                        age_field,
                        format!(
                            "is longer than the {} plan's maximum retention of {} days",
                            plan.id, plan.max_retention_days
                        ),
                    ));
                }
                Some(age) => age,
            };
            parsed.push(RetentionRule {
                selector,
                max_age_micros,
            });
        }
        Ok(parsed)
    }
}

/// A selector checked and normalised: non-empty, at most [`MAX_SELECTOR_BYTES`], no control
/// characters, a valid glob; a leading `/` is dropped.
pub fn parse_selector(field: &str, value: &str) -> Result<String> {
    let selector = value.strip_prefix('/').unwrap_or(value);
    if selector.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if selector.len() > MAX_SELECTOR_BYTES {
        return Err(Error::invalid(
            field,
            format!("longer than {MAX_SELECTOR_BYTES} bytes"),
        ));
    }
    if selector.chars().any(char::is_control) {
        return Err(Error::invalid(field, "contains control characters"));
    }
    glob(selector).map_err(|e| Error::invalid(field, format!("is not a valid glob: {e}")))?;
    Ok(selector.to_owned())
}

/// `*` and `?` never match `/`; `**` as a whole path component crosses folders.
fn glob(selector: &str) -> std::result::Result<Glob, globset::Error> {
    GlobBuilder::new(selector)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
}

/// One scope kind's rules, compiled once into a single matcher.
#[derive(Debug, Clone)]
pub struct CompiledRules {
    rules: Vec<RetentionRule>,
    set: GlobSet,
}

impl CompiledRules {
    /// Compiles stored rules. They were validated when set, so a failure here means the
    /// table was edited by hand: an internal error, not the client's.
    pub fn compile(rules: Vec<RetentionRule>) -> Result<Self> {
        let mut builder = GlobSetBuilder::new();
        for rule in &rules {
            builder.add(glob(&rule.selector).map_err(|e| {
                Error::Internal(format!("stored selector {:?}: {e}", rule.selector))
            })?);
        }
        let set = builder
            .build()
            .map_err(|e| Error::Internal(format!("retention rules: {e}")))?;
        Ok(Self { rules, set })
    }

    pub fn rules(&self) -> &[RetentionRule] {
        &self.rules
    }

    /// The first rule matching `path`, as (index, rule).
    pub fn first_match(&self, path: &str) -> Option<(usize, &RetentionRule)> {
        if self.rules.is_empty() {
            return None;
        }
        let first = self.set.matches(path).into_iter().min()?;
        Some((first, &self.rules[first]))
    }
}

/// An artifact's lifetime in microseconds from its creation: the push's `expire_in` (refused
/// beyond the plan's maximum, naming it), else `rule_age` (the first matching rule's), else
/// the project's setting for `kind`, else the plan's maximum. Rules and settings were
/// validated against the plan they were set under; a plan changed since bounds them here.
pub fn resolve_lifetime(
    expire_in: Option<i64>,
    rule_age: Option<i64>,
    controls: &UsageControls,
    kind: ScopeKind,
    plan: &Plan,
) -> Result<i64> {
    let max = i64::from(plan.max_retention_days) * DAY_MICROS;
    if let Some(ttl) = expire_in {
        if ttl > max {
            return Err(Error::invalid(
                "header.expire_in",
                format!(
                    "is longer than the {} plan's maximum retention of {} days",
                    plan.id, plan.max_retention_days
                ),
            ));
        }
        return Ok(ttl);
    }
    Ok(match rule_age {
        Some(age) => age.min(max),
        None => i64::from(controls.effective_retention_days(kind, plan)) * DAY_MICROS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan::OveragePolicy;

    fn plan(days: i32) -> Plan {
        Plan {
            id: "team".into(),
            version: 1,
            name: "Team".into(),
            currency: "USD".into(),
            included_storage_gib_months: 0,
            included_egress_gib: 0,
            storage_price_micros: 0,
            egress_price_micros: 0,
            ingress_price_micros: 0,
            storage_limit_bytes: None,
            max_artifact_bytes: 1,
            max_retention_days: days,
            overage_policy: OveragePolicy::Bill,
        }
    }

    fn rules(list: &[(&str, i64)]) -> CompiledRules {
        CompiledRules::compile(
            list.iter()
                .map(|(selector, days)| RetentionRule {
                    selector: parse_selector("s", selector).unwrap(),
                    max_age_micros: days * DAY_MICROS,
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let compiled = rules(&[("logs/debug/**", 1), ("logs/**", 7), ("**", 30)]);
        let first = |path| compiled.first_match(path).map(|(i, _)| i);
        assert_eq!(first("logs/debug/a/b.txt"), Some(0));
        assert_eq!(first("logs/app.log"), Some(1));
        assert_eq!(first("dist/app"), Some(2));
        // Order, not specificity: a broad rule first shadows the narrower ones.
        let broad_first = rules(&[("**", 30), ("logs/**", 7)]);
        assert_eq!(broad_first.first_match("logs/a").map(|(i, _)| i), Some(0));
    }

    #[test]
    fn a_star_stays_in_its_folder_and_a_double_star_crosses() {
        let compiled = rules(&[("logs/*.log", 1), ("reports/**/*.xml", 2), ("/dist/**", 3)]);
        let first = |path| compiled.first_match(path).map(|(i, _)| i);
        assert_eq!(first("logs/a.log"), Some(0));
        assert_eq!(first("logs/sub/a.log"), None);
        assert_eq!(first("reports/a.xml"), Some(1));
        assert_eq!(first("reports/x/y/a.xml"), Some(1));
        assert_eq!(first("reports/a.json"), None);
        assert_eq!(
            first("dist/x/y"),
            Some(2),
            "a leading / is Semaphore's form"
        );
        assert_eq!(first("other"), None);
    }

    #[test]
    fn rules_are_validated_with_the_field_and_the_limit() {
        let plan = plan(90);
        let err = |rules: Vec<(&str, Option<i64>)>| {
            RetentionPolicy::parse_rules(
                "policy.job_rules",
                rules.into_iter().map(|(s, a)| (s.to_owned(), a)),
                &plan,
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            err(vec![
                ("logs/**", Some(DAY_MICROS)),
                ("a/[b", Some(DAY_MICROS))
            ]),
            "policy.job_rules[1].selector: is not a valid glob: error parsing glob 'a/[b': \
             unclosed character class; missing ']'"
        );
        assert_eq!(
            err(vec![("x", Some(0))]),
            "policy.job_rules[0].max_age: must be positive"
        );
        assert_eq!(
            err(vec![("x", Some(-5))]),
            "policy.job_rules[0].max_age: must be positive"
        );
        assert_eq!(
            err(vec![("x", None)]),
            "policy.job_rules[0].max_age: is required"
        );
        assert_eq!(
            err(vec![("x", Some(90 * DAY_MICROS + 1))]),
            "policy.job_rules[0].max_age: is longer than the team plan's maximum retention of 90 days"
        );
        assert_eq!(
            err(vec![("", Some(1))]),
            "policy.job_rules[0].selector: must not be empty"
        );
        assert_eq!(
            err(vec![("/", Some(1))]),
            "policy.job_rules[0].selector: must not be empty"
        );
        assert_eq!(
            err(vec![("a\u{7}", Some(1))]),
            "policy.job_rules[0].selector: contains control characters"
        );
        let many: Vec<(&str, Option<i64>)> = vec![("x", Some(1)); MAX_RULES_PER_KIND + 1];
        assert_eq!(err(many), "policy.job_rules: more than 100 rules");
        let ok = RetentionPolicy::parse_rules(
            "policy.job_rules",
            [("/logs/**".to_owned(), Some(90 * DAY_MICROS))],
            &plan,
        )
        .unwrap();
        assert_eq!(ok[0].selector, "logs/**");
    }

    #[test]
    fn lifetime_resolution_order_and_bounds() {
        let plan = plan(30);
        let controls = UsageControls {
            retention_job_days: Some(10),
            ..Default::default()
        };
        let job = ScopeKind::Job;
        assert_eq!(
            resolve_lifetime(Some(5), Some(DAY_MICROS), &controls, job, &plan).unwrap(),
            5
        );
        assert_eq!(
            resolve_lifetime(None, Some(DAY_MICROS), &controls, job, &plan).unwrap(),
            DAY_MICROS
        );
        assert_eq!(
            resolve_lifetime(None, None, &controls, job, &plan).unwrap(),
            10 * DAY_MICROS
        );
        assert_eq!(
            resolve_lifetime(None, None, &controls, ScopeKind::Project, &plan).unwrap(),
            30 * DAY_MICROS
        );
        // A rule set under a bigger plan is bounded by the current one.
        assert_eq!(
            resolve_lifetime(None, Some(400 * DAY_MICROS), &controls, job, &plan).unwrap(),
            30 * DAY_MICROS
        );
        assert_eq!(
            resolve_lifetime(Some(30 * DAY_MICROS + 1), None, &controls, job, &plan)
                .unwrap_err()
                .to_string(),
            "header.expire_in: is longer than the team plan's maximum retention of 30 days"
        );
    }
}
