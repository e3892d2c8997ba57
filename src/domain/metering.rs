//! Exact usage and money arithmetic, all integers.
//!
//! - Storage is integrated in byte-microseconds (i128) from artifact intervals. A GiB-month
//!   is 2^30 bytes stored for a whole calendar month (UTC), months having their real length,
//!   so a month's GiB-months are `byte_micros / (2^30 × 10^6 × seconds_in_month)`.
//! - Network meters are bytes; their unit is the GiB (2^30 bytes).
//! - A quantity is kept as an exact fraction of its unit until money is computed; money is
//!   rounded half-up once per line item, and totals are sums of rounded line items.

use std::fmt;

use super::clock::Timestamp;
use super::error::{Error, Result};
use super::plan::{GIB, Plan};

pub const MICROS: i128 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// A calendar month in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    year: i32,
    month: u32, // 1..=12
}

impl Month {
    /// Parses `YYYY-MM`.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        let bad = || Error::invalid(field, format!("{value:?} is not a month in YYYY-MM form"));
        let (y, m) = value.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u32 = m.parse().map_err(|_| bad())?;
        if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Self { year, month })
    }

    /// Any instant has a month: i64 microseconds span about ±292,000 years, well inside
    /// the i32 year.
    pub fn containing(t: Timestamp) -> Self {
        let days = t.as_micros().div_euclid(MICROS as i64 * SECONDS_PER_DAY);
        let (year, month, _) = civil_from_days(days);
        Self { year, month }
    }

    /// First instant of the month. The months holding the extreme i64 instants begin (or,
    /// for [`Month::end`], end) beyond what i64 microseconds can hold: there the result
    /// saturates at the limit instead of overflowing. Requests never get that far: their
    /// timestamps are bounded to years 1–9999 at the edge ([`Timestamp::from_request`]).
    pub fn start(self) -> Timestamp {
        let micros = days_from_civil(self.year, self.month, 1)
            .checked_mul(SECONDS_PER_DAY * MICROS as i64)
            .unwrap_or(if self.year < 0 { i64::MIN } else { i64::MAX });
        Timestamp::from_micros(micros)
    }

    pub fn end(self) -> Timestamp {
        self.next().start()
    }

    pub fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn previous(self) -> Self {
        if self.month == 1 {
            Self {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Self {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    pub fn seconds(self) -> i64 {
        // Saturating: only the two clipped months at the i64 limits come near.
        self.end()
            .as_micros()
            .saturating_sub(self.start().as_micros())
            / MICROS as i64
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
pub fn civil_from_days(days: i64) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// Start of the UTC day containing `t`.
pub fn day_start(t: Timestamp) -> Timestamp {
    let day = MICROS as i64 * SECONDS_PER_DAY;
    Timestamp::from_micros(t.as_micros().div_euclid(day) * day)
}

pub const DAY_MICROS: i64 = MICROS as i64 * SECONDS_PER_DAY;

/// `YYYY-MM-DD` of the UTC day containing `t`.
pub fn format_day(t: Timestamp) -> String {
    let (y, m, d) = civil_from_days(t.as_micros().div_euclid(DAY_MICROS));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Parses `YYYY-MM-DD` to the start of that UTC day.
pub fn parse_day(field: &str, value: &str) -> Result<Timestamp> {
    let bad = || Error::invalid(field, format!("{value:?} is not a date in YYYY-MM-DD form"));
    let parts: Vec<&str> = value.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let month = Month::parse(field, &format!("{y}-{m}")).map_err(|_| bad())?;
    let day: u32 = d.parse().map_err(|_| bad())?;
    if d.len() != 2 || day == 0 {
        return Err(bad());
    }
    let start = month.start().as_micros() + i64::from(day - 1) * DAY_MICROS;
    if start >= month.end().as_micros() {
        return Err(bad());
    }
    Ok(Timestamp::from_micros(start))
}

/// One artifact's storage interval: `size` bytes from `start` until `end` (open when None).
#[derive(Debug, Clone, Copy)]
pub struct StorageInterval {
    pub size: i64,
    pub start: Timestamp,
    pub end: Option<Timestamp>,
}

/// Σ size × |[start, end) ∩ [from, to)| in byte-microseconds.
pub fn byte_micros(intervals: &[StorageInterval], from: Timestamp, to: Timestamp) -> i128 {
    intervals
        .iter()
        .map(|i| {
            let start = i.start.max(from).as_micros();
            let end = i.end.unwrap_or(to).min(to).as_micros();
            if end > start {
                i128::from(i.size) * i128::from(end - start)
            } else {
                0
            }
        })
        .sum()
}

/// `numerator / denominator` rounded half-up (both non-negative, denominator positive).
pub fn div_round_half_up(numerator: i128, denominator: i128) -> i128 {
    (2 * numerator + denominator) / (2 * denominator)
}

/// `numerator / denominator` as a decimal string with `places` digits, rounded half-up.
pub fn decimal(numerator: i128, denominator: i128, places: u32) -> String {
    let scale = 10i128.pow(places);
    let scaled = div_round_half_up(numerator * scale, denominator);
    if places == 0 {
        return scaled.to_string();
    }
    format!(
        "{}.{:0width$}",
        scaled / scale,
        scaled % scale,
        width = places as usize
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    Storage,
    Egress,
    Ingress,
}

impl Meter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Storage => "storage",
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Self::Storage => "GiB-month",
            Self::Egress | Self::Ingress => "GiB",
        }
    }
}

/// An exact amount of a meter's unit: `numerator / denominator` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    pub numerator: i128,
    pub denominator: i128,
}

impl Quantity {
    /// Storage over `month`, from byte-microseconds.
    pub fn gib_months(byte_micros: i128, month: Month) -> Self {
        Self {
            numerator: byte_micros,
            denominator: i128::from(GIB) * MICROS * i128::from(month.seconds()),
        }
    }

    pub fn gib(bytes: i128) -> Self {
        Self {
            numerator: bytes,
            denominator: i128::from(GIB),
        }
    }

    pub fn whole_units(units: i64, like: Quantity) -> Self {
        Self {
            numerator: i128::from(units) * like.denominator,
            denominator: like.denominator,
        }
    }

    pub fn saturating_sub(self, other: Quantity) -> Self {
        debug_assert_eq!(self.denominator, other.denominator);
        Self {
            numerator: (self.numerator - other.numerator).max(0),
            denominator: self.denominator,
        }
    }

    /// `max(0, self − other)` for quantities over any denominators (as stored: reduced).
    pub fn saturating_sub_any(self, other: Quantity) -> Self {
        if self.denominator == other.denominator {
            return self.saturating_sub(other).reduced();
        }
        let g = gcd(self.denominator, other.denominator).max(1);
        let lcm = self.denominator / g * other.denominator;
        Self {
            numerator: (self.numerator * (lcm / self.denominator)
                - other.numerator * (lcm / other.denominator))
                .max(0),
            denominator: lcm,
        }
        .reduced()
    }

    /// The same amount over a denominator `factor` times larger.
    fn scaled(self, factor: i128) -> Self {
        Self {
            numerator: self.numerator * factor,
            denominator: self.denominator * factor,
        }
    }

    /// The same amount in lowest terms (what is stored and shown does not depend on how a
    /// quantity was reached).
    pub fn reduced(self) -> Self {
        let g = gcd(self.numerator, self.denominator).max(1);
        Self {
            numerator: self.numerator / g,
            denominator: self.denominator / g,
        }
    }

    /// Six decimals, rounded half-up: how quantities are shown.
    pub fn to_decimal(self) -> String {
        decimal(self.numerator, self.denominator, 6)
    }

    /// `self × price`, rounded half-up to whole micro-units.
    pub fn price(self, micros_per_unit: i64) -> i128 {
        let q = self.reduced();
        div_round_half_up(q.numerator * i128::from(micros_per_unit), q.denominator)
    }
}

/// One line on a bill: a meter's usage within one plan segment of the month (or, with
/// `correction_for`, usage of an already invoiced month that arrived after its invoice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    pub meter: Meter,
    pub usage: Quantity,
    pub included: Quantity,
    pub billable: Quantity,
    pub unit_price_micros: i64,
    pub amount_micros: i128,
    pub plan_id: String,
    pub plan_version: i32,
    /// The service period the line covers (a plan segment of the month).
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    pub correction_for: Option<Month>,
}

/// A stretch of a month billed under one plan version: `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub plan: Plan,
    pub from: Timestamp,
    pub to: Timestamp,
}

impl Segment {
    fn micros(&self) -> i128 {
        i128::from(self.to.as_micros() - self.from.as_micros())
    }
}

impl LineItem {
    /// A meter's line for `usage` within `segment` of `month`. The included amount is the
    /// plan's included units prorated by the segment's share of the month, kept as an exact
    /// fraction (the usage is moved onto a denominator that makes it exact), so the one
    /// rounding step of a line stays the money rounding in [`Quantity::price`]. A segment
    /// covering the whole month includes exactly the plan's units.
    pub fn new(
        meter: Meter,
        usage: Quantity,
        included_units: i64,
        unit_price_micros: i64,
        segment: &Segment,
        month: Month,
    ) -> Self {
        let month_micros = i128::from(month.seconds()) * MICROS;
        let seg_micros = segment.micros().clamp(0, month_micros);
        let (usage, included) = if seg_micros == month_micros {
            (usage, Quantity::whole_units(included_units, usage))
        } else {
            // included = units × seg / month of the unit: over a denominator that is a
            // multiple of the month's length it is an exact integer numerator.
            let usage = if usage.denominator % month_micros == 0 {
                usage
            } else {
                usage.scaled(month_micros)
            };
            let included = Quantity {
                numerator: i128::from(included_units)
                    * (usage.denominator / month_micros)
                    * seg_micros,
                denominator: usage.denominator,
            };
            (usage, included)
        };
        let billable = usage.saturating_sub(included);
        Self {
            meter,
            usage: usage.reduced(),
            included: included.reduced(),
            billable: billable.reduced(),
            unit_price_micros,
            amount_micros: billable.price(unit_price_micros),
            plan_id: segment.plan.id.clone(),
            plan_version: segment.plan.version,
            period_start: segment.from,
            period_end: segment.to,
            correction_for: None,
        }
    }
}

/// The usage a bill (or one segment of it) is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonthUsage {
    pub storage_byte_micros: i128,
    pub egress_bytes: i128,
    pub ingress_bytes: i128,
}

/// A segment's line items: storage, egress, ingress.
pub fn segment_lines(segment: &Segment, month: Month, usage: &MonthUsage) -> Vec<LineItem> {
    let plan = &segment.plan;
    vec![
        LineItem::new(
            Meter::Storage,
            Quantity::gib_months(usage.storage_byte_micros, month),
            plan.included_storage_gib_months,
            plan.storage_price_micros,
            segment,
            month,
        ),
        LineItem::new(
            Meter::Egress,
            Quantity::gib(usage.egress_bytes),
            plan.included_egress_gib,
            plan.egress_price_micros,
            segment,
            month,
        ),
        LineItem::new(
            Meter::Ingress,
            Quantity::gib(usage.ingress_bytes),
            0,
            plan.ingress_price_micros,
            segment,
            month,
        ),
    ]
}

/// A bill's line items and total for `usage` over the whole `month` under one plan.
pub fn bill_lines(plan: &Plan, month: Month, usage: &MonthUsage) -> (Vec<LineItem>, i128) {
    let segment = Segment {
        plan: plan.clone(),
        from: month.start(),
        to: month.end(),
    };
    let lines = segment_lines(&segment, month, usage);
    let total = total(&lines);
    (lines, total)
}

/// The sum of rounded line items.
pub fn total(lines: &[LineItem]) -> i128 {
    lines.iter().map(|l| l.amount_micros).sum()
}

/// One project's totals for a month, as the all-projects listing shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectTotals {
    pub project_id: String,
    pub plan_id: String,
    pub currency: String,
    pub total_micros: i64,
    pub storage_byte_micros: i128,
    pub egress_bytes: i64,
    pub ingress_bytes: i64,
}

/// A column the all-projects listing can be ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjectsSortKey {
    Project,
    Total,
    Storage,
    Egress,
    Ingress,
}

impl ProjectsSortKey {
    pub const ALL: [Self; 5] = [
        Self::Project,
        Self::Total,
        Self::Storage,
        Self::Egress,
        Self::Ingress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Project => "project",
            Self::Total => "total",
            Self::Storage => "storage",
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// The figure a row is ordered by (none when ordering by project id alone).
    pub fn value(self, row: &ProjectTotals) -> Option<i128> {
        match self {
            Self::Project => None,
            Self::Total => Some(i128::from(row.total_micros)),
            Self::Storage => Some(row.storage_byte_micros),
            Self::Egress => Some(i128::from(row.egress_bytes)),
            Self::Ingress => Some(row.ingress_bytes.into()),
        }
    }
}

/// The order of the all-projects listing: a column and a direction, ties broken by project
/// id (ascending; by the direction itself when the column is the project id), so every
/// project has one place and a page boundary never repeats or skips one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectsSort {
    pub key: ProjectsSortKey,
    pub descending: bool,
}

impl Default for ProjectsSort {
    /// Largest total first: ListProjectsUsage's order.
    fn default() -> Self {
        Self {
            key: ProjectsSortKey::Total,
            descending: true,
        }
    }
}

/// Where a page of the all-projects listing ended: the last row's figure (by the sort's
/// column; none for the project column) and project id. The next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectsCursor {
    pub value: Option<i128>,
    pub project: String,
}

impl ProjectsSort {
    /// Where `row` stands relative to `other` in this order.
    pub fn compare(&self, row: &ProjectTotals, other: &ProjectTotals) -> std::cmp::Ordering {
        self.compare_to(row, &self.cursor(other))
    }

    /// Where `row` stands relative to the row `cursor` was taken from.
    pub fn compare_to(&self, row: &ProjectTotals, cursor: &ProjectsCursor) -> std::cmp::Ordering {
        let by_value = self.key.value(row).cmp(&cursor.value);
        let by_value = if self.descending {
            by_value.reverse()
        } else {
            by_value
        };
        let by_project = row.project_id.cmp(&cursor.project);
        let by_project = if self.key == ProjectsSortKey::Project && self.descending {
            by_project.reverse()
        } else {
            by_project
        };
        by_value.then(by_project)
    }

    /// The cursor of a page that ends with `row`.
    pub fn cursor(&self, row: &ProjectTotals) -> ProjectsCursor {
        ProjectsCursor {
            value: self.key.value(row),
            project: row.project_id.clone(),
        }
    }
}

/// Byte-microseconds as exact byte-seconds (six decimals are exact: 10^6 µs per second).
pub fn byte_seconds(byte_micros: i128) -> String {
    decimal(byte_micros, MICROS, 6)
}

/// GiB-months over an arbitrary range, summing each calendar month's exact fraction.
pub fn gib_months_over(parts: &[(Month, i128)]) -> String {
    // Σ n_i / d_i as one exact fraction, reduced as it goes to stay well inside i128.
    let (mut num, mut den) = (0i128, 1i128);
    for &(month, byte_micros) in parts {
        let q = Quantity::gib_months(byte_micros, month);
        let g = gcd(den, q.denominator);
        let lcm = den / g * q.denominator;
        num = num * (lcm / den) + q.numerator * (lcm / q.denominator);
        den = lcm;
        let r = gcd(num, den).max(1);
        num /= r;
        den /= r;
    }
    decimal(num, den, 6)
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.abs()
}

/// The calendar months that `[from, to)` touches, each with the part of the range inside it.
pub fn split_by_month(from: Timestamp, to: Timestamp) -> Vec<(Month, Timestamp, Timestamp)> {
    let mut parts = Vec::new();
    let mut month = Month::containing(from);
    let mut cursor = from;
    while cursor < to {
        let end = month.end().min(to);
        parts.push((month, cursor, end));
        cursor = end;
        month = month.next();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32) -> Timestamp {
        Timestamp::from_seconds(days_from_civil(y, m, d) * SECONDS_PER_DAY)
    }

    #[test]
    fn calendar_round_trips() {
        for days in [-1000, 0, 59, 60, 365, 11_016, 20_758, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(2026, 11, 1), 20_758);
        let feb = Month::parse("m", "2028-02").unwrap();
        assert_eq!(feb.seconds(), 29 * 86_400);
        assert_eq!(
            Month::parse("m", "2026-12").unwrap().next().to_string(),
            "2027-01"
        );
        assert!(Month::parse("m", "2026-13").is_err());
        assert!(Month::parse("m", "26-01").is_err());
        assert_eq!(parse_day("d", "2026-02-28").unwrap(), at(2026, 2, 28));
        assert!(parse_day("d", "2026-02-29").is_err());
        assert_eq!(format_day(at(2026, 3, 9)), "2026-03-09");
    }

    #[test]
    fn months_at_the_i64_limits_saturate_instead_of_overflowing() {
        let last = Month::containing(Timestamp::from_micros(i64::MAX));
        assert!(last.start() <= Timestamp::from_micros(i64::MAX));
        assert_eq!(last.end(), Timestamp::from_micros(i64::MAX));
        let first = Month::containing(Timestamp::from_micros(i64::MIN));
        assert_eq!(first.start(), Timestamp::from_micros(i64::MIN));
        assert!(first.seconds() > 0 && last.seconds() > 0);
        let parts = split_by_month(
            Timestamp::from_micros(i64::MAX - 10),
            Timestamp::from_micros(i64::MAX),
        );
        assert_eq!(parts.len(), 1);
        // The request range (years 1..=9999) is exact, with room to spare.
        let earliest = Month::containing(Timestamp::EARLIEST);
        assert_eq!(
            (earliest.to_string(), earliest.start()),
            ("0001-01".into(), Timestamp::EARLIEST)
        );
        let latest = Month::containing(Timestamp::LATEST);
        assert_eq!(latest.to_string(), "9999-12");
        assert_eq!(latest.end().as_micros(), Timestamp::LATEST.as_micros() + 1);
    }

    #[test]
    fn githubs_worked_example() {
        // 3 GiB for 10 days, then 12 GiB for 21 days, in a 31-day month:
        // 6,768 GiB-hours = 9.096774 GiB-months.
        let month = Month::parse("m", "2026-01").unwrap();
        let gib = GIB;
        let intervals = [
            StorageInterval {
                size: 3 * gib,
                start: at(2026, 1, 1),
                end: Some(at(2026, 1, 11)),
            },
            StorageInterval {
                size: 12 * gib,
                start: at(2026, 1, 11),
                end: None,
            },
        ];
        let bm = byte_micros(&intervals, month.start(), month.end());
        assert_eq!(bm, i128::from(gib) * 6_768 * 3_600 * MICROS);
        assert_eq!(Quantity::gib_months(bm, month).to_decimal(), "9.096774");
    }

    #[test]
    fn rounding_is_half_up_once_per_line() {
        assert_eq!(div_round_half_up(5, 10), 1);
        assert_eq!(div_round_half_up(4, 10), 0);
        assert_eq!(div_round_half_up(15, 10), 2);
        assert_eq!(decimal(1, 3, 6), "0.333333");
        assert_eq!(decimal(2, 3, 6), "0.666667");
        assert_eq!(decimal(5, 1, 2), "5.00");
        // 0.5 GiB of egress at 0.35 per GiB = 0.175 → 175000 micros exactly.
        assert_eq!(Quantity::gib(i128::from(GIB / 2)).price(350_000), 175_000);
    }

    #[test]
    fn ranges_split_at_month_boundaries() {
        let parts = split_by_month(at(2026, 1, 30), at(2026, 3, 2));
        let months: Vec<String> = parts.iter().map(|p| p.0.to_string()).collect();
        assert_eq!(months, ["2026-01", "2026-02", "2026-03"]);
        assert_eq!(parts[1].1, at(2026, 2, 1));
        assert_eq!(parts[1].2, at(2026, 3, 1));
        // A whole GiB for all of January and all of February: exactly 2 GiB-months.
        let jan = Month::parse("m", "2026-01").unwrap();
        let feb = jan.next();
        let full = |m: Month| i128::from(GIB) * MICROS * i128::from(m.seconds());
        assert_eq!(
            gib_months_over(&[(jan, full(jan)), (feb, full(feb))]),
            "2.000000"
        );
    }
}
