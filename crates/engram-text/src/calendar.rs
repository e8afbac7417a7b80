//! Civil (proleptic Gregorian, UTC) dates for engram's time handling: turning a
//! [`Timestamp`] into a date and back, month names, and the date shapes people write
//! ("8 May, 2023", "May 8 2023", "2023-05-08").
//!
//! The day arithmetic is Howard Hinnant's `days_from_civil` / `civil_from_days`, exact for any
//! date a timestamp can hold.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time with microsecond precision (what the store keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// The UTC date, as `2024-05-01`.
    pub fn date_string(self) -> String {
        Date::of(self).to_string()
    }

    /// Time elapsed from `self` to `later`, zero if `later` is earlier.
    pub fn elapsed_until(self, later: Timestamp) -> Duration {
        Duration::from_micros(later.0.saturating_sub(self.0).max(0).unsigned_abs())
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }
}

pub const MICROS_PER_DAY: i64 = 86_400_000_000;

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    pub year: i32,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
}

impl std::fmt::Display for Date {
    /// ISO 8601: `2024-05-01`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl Date {
    /// The date, if it exists (no 31 April).
    pub fn new(year: i32, month: u32, day: u32) -> Option<Self> {
        ((1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month))
            .then_some(Self { year, month, day })
    }

    /// Days since 1970-01-01.
    pub fn days(self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    pub fn from_days(days: i64) -> Self {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Self { year, month, day }
    }

    /// The date a timestamp falls on (UTC).
    pub fn of(t: Timestamp) -> Self {
        Self::from_days(t.as_micros().div_euclid(MICROS_PER_DAY))
    }

    /// Midnight (UTC) at the start of this date.
    pub fn start(self) -> Timestamp {
        Timestamp::from_micros(self.days().saturating_mul(MICROS_PER_DAY))
    }

    /// 0 = Monday .. 6 = Sunday.
    pub fn weekday(self) -> u32 {
        // 1970-01-01 was a Thursday (3).
        (self.days() + 3).rem_euclid(7) as u32
    }

    pub fn add_days(self, days: i64) -> Self {
        Self::from_days(self.days() + days)
    }

    /// The first day of the month `months` after this date's month (negative: before).
    pub fn month_start_offset(self, months: i32) -> Self {
        let index = self.year * 12 + self.month as i32 - 1 + months;
        Self {
            year: index.div_euclid(12),
            month: index.rem_euclid(12) as u32 + 1,
            day: 1,
        }
    }
}

pub fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

pub fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

/// Whether `word` (lower case) is a month's full name.
pub fn is_month_name(word: &str) -> bool {
    MONTHS.contains(&word)
}

/// The month a name or its three-letter abbreviation ("may", "Sept", "dec.") names.
pub fn month(word: &str) -> Option<u32> {
    let word = word.trim_end_matches('.').to_ascii_lowercase();
    if word.len() < 3 {
        return None;
    }
    MONTHS
        .iter()
        .position(|m| *m == word || (m.starts_with(&word) && (word.len() == 3 || word == "sept")))
        .map(|i| i as u32 + 1)
}

const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// 0 = Monday .. 6 = Sunday, for a weekday's name.
pub fn weekday(word: &str) -> Option<u32> {
    let word = word.to_ascii_lowercase();
    WEEKDAYS.iter().position(|d| *d == word).map(|i| i as u32)
}

/// Parse a time of day and date such as LoCoMo's session times ("1:56 pm on 8 May, 2023"),
/// or a bare date ("8 May 2023", "May 8, 2023", "2023-05-08"); the result is UTC.
pub fn parse_datetime(text: &str) -> Option<Timestamp> {
    let text = text.trim();
    let (time, date) = match text.split_once(" on ") {
        Some((time, date)) => (Some(time), date),
        None => (None, text),
    };
    let date = parse_date(date)?;
    let seconds = match time {
        Some(time) => parse_time_of_day(time)?,
        None => 0,
    };
    Some(Timestamp::from_micros(
        date.start().as_micros() + seconds * 1_000_000,
    ))
}

/// "1:56 pm", "13:05", "9 am" as seconds after midnight.
fn parse_time_of_day(text: &str) -> Option<i64> {
    let text = text.trim().to_ascii_lowercase();
    let (clock, meridiem) = if let Some(rest) = text.strip_suffix("pm") {
        (rest.trim(), Some(12))
    } else if let Some(rest) = text.strip_suffix("am") {
        (rest.trim(), Some(0))
    } else {
        (text.as_str(), None)
    };
    let (hour, minute) = match clock.split_once(':') {
        Some((h, m)) => (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?),
        None => (clock.parse::<i64>().ok()?, 0),
    };
    let hour = match meridiem {
        Some(offset) if (1..=12).contains(&hour) => hour % 12 + offset,
        Some(_) => return None,
        None if (0..24).contains(&hour) => hour,
        None => return None,
    };
    (0..60)
        .contains(&minute)
        .then_some(hour * 3600 + minute * 60)
}

/// A date written as "8 May, 2023", "May 8 2023", "May 8th, 2023" or "2023-05-08".
pub fn parse_date(text: &str) -> Option<Date> {
    let text = text.trim();
    if let Some(date) = parse_iso_date(text) {
        return Some(date);
    }
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    match words.as_slice() {
        [a, b, year] => {
            let year = year.parse().ok()?;
            match (month(a), month(b)) {
                (Some(m), None) => Date::new(year, m, ordinal(b)?),
                (None, Some(m)) => Date::new(year, m, ordinal(a)?),
                _ => None,
            }
        }
        _ => None,
    }
}

/// "8", "8th", "21st" as a day of the month.
pub fn ordinal(word: &str) -> Option<u32> {
    let digits = word.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &word[digits.len()..];
    if !matches!(suffix, "" | "st" | "nd" | "rd" | "th") {
        return None;
    }
    digits.parse().ok().filter(|d| (1..=31).contains(d))
}

fn parse_iso_date(text: &str) -> Option<Date> {
    let mut parts = text.splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    Date::new(y.parse().ok()?, m.parse().ok()?, d.parse().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip_across_eras() {
        for days in (-800_000..800_000).step_by(997) {
            assert_eq!(Date::from_days(days).days(), days);
        }
        assert_eq!(Date::from_days(0), Date::new(1970, 1, 1).unwrap());
        assert_eq!(Date::new(2000, 3, 1).unwrap().days(), 11_017);
        assert_eq!(Date::new(2023, 5, 8).unwrap().weekday(), 0, "a Monday");
        assert_eq!(Date::new(2024, 2, 30), None);
        assert!(Date::new(2024, 2, 29).is_some());
    }

    #[test]
    fn month_offsets_wrap_years() {
        let d = Date::new(2023, 1, 17).unwrap();
        assert_eq!(d.month_start_offset(-1), Date::new(2022, 12, 1).unwrap());
        assert_eq!(d.month_start_offset(12), Date::new(2024, 1, 1).unwrap());
        assert_eq!(d.month_start_offset(0), Date::new(2023, 1, 1).unwrap());
    }

    #[test]
    fn locomo_session_times_parse() {
        let t = parse_datetime("1:56 pm on 8 May, 2023").unwrap();
        assert_eq!(Date::of(t), Date::new(2023, 5, 8).unwrap());
        assert_eq!(
            t.as_micros() - Date::new(2023, 5, 8).unwrap().start().as_micros(),
            (13 * 3600 + 56 * 60) * 1_000_000
        );
        let t = parse_datetime("12:09 am on 13 September, 2023").unwrap();
        assert_eq!(
            t.as_micros() - Date::of(t).start().as_micros(),
            9 * 60 * 1_000_000
        );
        assert_eq!(
            parse_date("May 8th, 2023"),
            Some(Date::new(2023, 5, 8).unwrap())
        );
        assert_eq!(
            parse_date("2023-05-08"),
            Some(Date::new(2023, 5, 8).unwrap())
        );
        assert_eq!(parse_datetime("13:00 pm on 8 May, 2023"), None);
        assert_eq!(parse_date("8 Mayo 2023"), None);
        assert_eq!(month("Sept"), Some(9));
        assert_eq!(month("ma"), None);
    }
}
