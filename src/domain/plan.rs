//! Plans and per-project usage controls: the limits and prices a bill is computed against.

use super::error::{Error, Result};

pub const GIB: i64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OveragePolicy {
    /// Refuse work beyond the plan's limits (RESOURCE_EXHAUSTED).
    Block,
    /// Allow it and bill the overage.
    Bill,
}

impl OveragePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Bill => "bill",
        }
    }

    pub fn from_db(value: &str) -> Option<Self> {
        match value {
            "block" => Some(Self::Block),
            "bill" => Some(Self::Bill),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    /// Which version of the plan these figures are: `UpdatePlan` makes a new one effective
    /// from that instant, and bills use the version in effect over each stretch of a month.
    pub version: i32,
    pub name: String,
    pub currency: String,
    pub included_storage_gib_months: i64,
    pub included_egress_gib: i64,
    /// Micro-units of `currency` per GiB-month.
    pub storage_price_micros: i64,
    /// Micro-units per GiB sent.
    pub egress_price_micros: i64,
    /// Micro-units per GiB received.
    pub ingress_price_micros: i64,
    pub storage_limit_bytes: Option<i64>,
    pub max_artifact_bytes: i64,
    pub max_retention_days: i32,
    pub overage_policy: OveragePolicy,
}

impl Plan {
    /// Checks a plan's own consistency (ids, currency code, non-negative figures).
    pub fn validate(&self) -> Result<()> {
        super::scope::validate_id("plan.id", &self.id)?;
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(Error::invalid("plan.name", "must be 1–200 characters"));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Error::invalid(
                "plan.currency",
                "must be a 3-letter ISO 4217 code such as USD",
            ));
        }
        for (field, value) in [
            (
                "plan.included_storage_gib_months",
                self.included_storage_gib_months,
            ),
            ("plan.included_egress_gib", self.included_egress_gib),
            ("plan.storage_price_micros", self.storage_price_micros),
            ("plan.egress_price_micros", self.egress_price_micros),
            ("plan.ingress_price_micros", self.ingress_price_micros),
            ("plan.max_artifact_bytes", self.max_artifact_bytes),
            (
                "plan.storage_limit_bytes",
                self.storage_limit_bytes.unwrap_or(0),
            ),
        ] {
            if value < 0 {
                return Err(Error::invalid(field, "must not be negative"));
            }
        }
        if !(1..=36_500).contains(&self.max_retention_days) {
            return Err(Error::invalid(
                "plan.max_retention_days",
                "must be between 1 and 36500",
            ));
        }
        Ok(())
    }
}

/// What a project's maintainers set for it (CircleCI's "Usage Controls").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageControls {
    pub retention_job_days: Option<i32>,
    pub retention_workflow_days: Option<i32>,
    pub retention_project_days: Option<i32>,
    /// Monthly spend cap in micro-units (BILL plans).
    pub spend_cap_micros: Option<i64>,
    pub storage_cap_bytes: Option<i64>,
    /// Percentages of the included quota (or cap) at which an alert is recorded.
    pub alert_thresholds: Vec<u32>,
    /// GitLab's "keep artifacts from most recent successful jobs"; `None`: the default, on.
    pub keep_latest_per_ref: Option<bool>,
}

impl UsageControls {
    /// The retention an artifact of `kind` gets when its push sets none: the project's
    /// setting clamped to the plan's maximum, else the plan's maximum.
    pub fn effective_retention_days(&self, kind: super::ScopeKind, plan: &Plan) -> i32 {
        self.retention_days(kind)
            .map_or(plan.max_retention_days, |days| {
                days.min(plan.max_retention_days)
            })
    }

    /// Whether the latest PASSED job's artifacts of each (ref, name) are kept (default on).
    pub fn keeps_latest_per_ref(&self) -> bool {
        self.keep_latest_per_ref.unwrap_or(true)
    }

    pub fn retention_days(&self, kind: super::ScopeKind) -> Option<i32> {
        match kind {
            super::ScopeKind::Job => self.retention_job_days,
            super::ScopeKind::Workflow => self.retention_workflow_days,
            super::ScopeKind::Project => self.retention_project_days,
        }
    }

    /// Checks the controls against the plan they live under.
    pub fn validate(&self, plan: &Plan) -> Result<()> {
        self.validate_fields(plan, ControlsMask::ALL)
    }

    /// Checks the masked fields against the plan they live under.
    pub fn validate_fields(&self, plan: &Plan, mask: ControlsMask) -> Result<()> {
        for (field, days, set) in [
            (
                "controls.retention_job_days",
                self.retention_job_days,
                mask.retention_job_days,
            ),
            (
                "controls.retention_workflow_days",
                self.retention_workflow_days,
                mask.retention_workflow_days,
            ),
            (
                "controls.retention_project_days",
                self.retention_project_days,
                mask.retention_project_days,
            ),
        ] {
            if set
                && let Some(days) = days
                && !(1..=plan.max_retention_days).contains(&days)
            {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{days} days is outside 1..{} (the {} plan's maximum retention)",
                        plan.max_retention_days, plan.id
                    ),
                ));
            }
        }
        if self.spend_cap_micros.is_some_and(|v| v < 0) {
            return Err(Error::invalid(
                "controls.spend_cap_micros",
                "must not be negative",
            ));
        }
        if self.storage_cap_bytes.is_some_and(|v| v < 0) {
            return Err(Error::invalid(
                "controls.storage_cap_bytes",
                "must not be negative",
            ));
        }
        if let Some(bad) = self
            .alert_thresholds
            .iter()
            .find(|t| !(1..=1000).contains(*t))
        {
            return Err(Error::invalid(
                "controls.alert_thresholds",
                format!("{bad} is outside 1..1000 percent"),
            ));
        }
        Ok(())
    }

    pub fn thresholds_to_db(&self) -> String {
        let mut sorted = self.alert_thresholds.clone();
        sorted.sort_unstable();
        sorted.dedup();
        sorted
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn thresholds_from_db(value: &str) -> Vec<u32> {
        value
            .split(',')
            .filter_map(|t| t.trim().parse().ok())
            .collect()
    }
}

/// Which usage-control fields an update sets (the request's field mask).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlsMask {
    pub retention_job_days: bool,
    pub retention_workflow_days: bool,
    pub retention_project_days: bool,
    pub spend_cap_micros: bool,
    pub storage_cap_bytes: bool,
    pub alert_thresholds: bool,
    pub keep_latest_per_ref: bool,
}

impl ControlsMask {
    pub const ALL: Self = Self {
        retention_job_days: true,
        retention_workflow_days: true,
        retention_project_days: true,
        spend_cap_micros: true,
        storage_cap_bytes: true,
        alert_thresholds: true,
        keep_latest_per_ref: true,
    };

    /// The fields an update without a mask sets: those present in it. (An empty mask used
    /// to mean every field, so a request with no controls wiped every control.)
    pub fn present(update: &UsageControls) -> Self {
        Self {
            retention_job_days: update.retention_job_days.is_some(),
            retention_workflow_days: update.retention_workflow_days.is_some(),
            retention_project_days: update.retention_project_days.is_some(),
            spend_cap_micros: update.spend_cap_micros.is_some(),
            storage_cap_bytes: update.storage_cap_bytes.is_some(),
            alert_thresholds: !update.alert_thresholds.is_empty(),
            keep_latest_per_ref: update.keep_latest_per_ref.is_some(),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Parses field-mask paths; an empty list gives an empty mask.
    pub fn parse(paths: &[String]) -> Result<Self, Error> {
        let mut mask = Self::default();
        for path in paths {
            match path.as_str() {
                "retention_job_days" => mask.retention_job_days = true,
                "retention_workflow_days" => mask.retention_workflow_days = true,
                "retention_project_days" => mask.retention_project_days = true,
                "spend_cap_micros" => mask.spend_cap_micros = true,
                "storage_cap_bytes" => mask.storage_cap_bytes = true,
                "alert_thresholds" => mask.alert_thresholds = true,
                "keep_latest_per_ref" => mask.keep_latest_per_ref = true,
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!("{other:?} is not a UsageControls field"),
                    ));
                }
            }
        }
        Ok(mask)
    }

    pub fn apply(self, current: &UsageControls, update: UsageControls) -> UsageControls {
        fn pick<T>(set: bool, new: T, old: T) -> T {
            if set { new } else { old }
        }
        UsageControls {
            retention_job_days: pick(
                self.retention_job_days,
                update.retention_job_days,
                current.retention_job_days,
            ),
            retention_workflow_days: pick(
                self.retention_workflow_days,
                update.retention_workflow_days,
                current.retention_workflow_days,
            ),
            retention_project_days: pick(
                self.retention_project_days,
                update.retention_project_days,
                current.retention_project_days,
            ),
            spend_cap_micros: pick(
                self.spend_cap_micros,
                update.spend_cap_micros,
                current.spend_cap_micros,
            ),
            storage_cap_bytes: pick(
                self.storage_cap_bytes,
                update.storage_cap_bytes,
                current.storage_cap_bytes,
            ),
            alert_thresholds: if self.alert_thresholds {
                update.alert_thresholds
            } else {
                current.alert_thresholds.clone()
            },
            keep_latest_per_ref: pick(
                self.keep_latest_per_ref,
                update.keep_latest_per_ref,
                current.keep_latest_per_ref,
            ),
        }
    }
}

/// A project's plan and controls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRecord {
    pub project_id: super::ProjectId,
    pub plan: Plan,
    pub controls: UsageControls,
    pub created_at: super::Timestamp,
}
