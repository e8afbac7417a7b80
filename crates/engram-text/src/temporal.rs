//! Time expressions in a query, turned into an event-time window relative to the request time.
//!
//! Understood (case-insensitive, anywhere in the query; the first one found wins):
//! - days: `today`, `tonight`, `this morning|afternoon|evening`, `yesterday`,
//!   `the day before yesterday`, `last night`, explicit dates (`8 May 2023`, `May 8th, 2023`,
//!   `2023-05-08`);
//! - weekdays: `on Monday`, `last Friday` (the most recent one before today);
//! - weeks (Monday to Sunday): `this week`, `last|past|previous week`, `this|last weekend`;
//! - months and years: `this|last month`, `this|last year`, `in May 2023`, `May 2023`, `in May`
//!   (the most recent May that has begun), `in 2023`;
//! - distances: `3 days ago`, `two weeks ago`, `a month ago`, `a couple of years ago` (the day,
//!   week, month or year that far back), `past|last 10 days` (up to the request time).
//!
//! Everything is UTC. The window is used as a boost (the temporal strategy of a Recall), never
//! as a filter: a misread phrase can only reorder, not hide, results.

use crate::calendar::{self, Date, Timestamp};

/// A half-open event-time window `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: Timestamp,
    pub to: Timestamp,
}

impl Window {
    fn days(first: Date, days: i64) -> Self {
        Self {
            from: first.start(),
            to: first.add_days(days).start(),
        }
    }

    fn day(date: Date) -> Self {
        Self::days(date, 1)
    }

    fn week_of(date: Date) -> Self {
        Self::days(date.add_days(-i64::from(date.weekday())), 7)
    }

    fn month_of(date: Date) -> Self {
        let first = date.month_start_offset(0);
        Self {
            from: first.start(),
            to: date.month_start_offset(1).start(),
        }
    }

    fn year(year: i32) -> Option<Self> {
        Some(Self {
            from: Date::new(year, 1, 1)?.start(),
            to: Date::new(year + 1, 1, 1)?.start(),
        })
    }
}

fn number(word: &str) -> Option<i64> {
    const WORDS: [&str; 12] = [
        "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve",
    ];
    match word {
        "a" | "an" => Some(1),
        _ => WORDS
            .iter()
            .position(|w| *w == word)
            .map(|i| i as i64 + 1)
            .or_else(|| word.parse().ok().filter(|n| (1..=10_000).contains(n))),
    }
}

#[derive(Clone, Copy)]
enum Unit {
    Day,
    Week,
    Month,
    Year,
}

fn unit(word: &str) -> Option<Unit> {
    match word.trim_end_matches('s') {
        "day" => Some(Unit::Day),
        "week" => Some(Unit::Week),
        "month" => Some(Unit::Month),
        "year" => Some(Unit::Year),
        _ => None,
    }
}

/// `n` units before `today`, and the window of the unit containing that moment.
fn units_ago(today: Date, n: i64, unit: Unit) -> Option<Window> {
    match unit {
        Unit::Day => Some(Window::day(today.add_days(-n))),
        Unit::Week => Some(Window::week_of(today.add_days(-7 * n))),
        Unit::Month => Some(Window::month_of(
            today.month_start_offset(-i32::try_from(n).ok()?),
        )),
        Unit::Year => Window::year(today.year - i32::try_from(n).ok()?),
    }
}

/// The window the first time expression in `query` names, relative to `now`.
pub fn window(query: &str, now: Timestamp) -> Option<Window> {
    let words: Vec<String> = query
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '?' | '!' | ';' | '"' | '(' | ')'))
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric() && c != '-')
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    let today = Date::of(now);
    (0..words.len()).find_map(|i| at(&words[i..], today, now))
}

fn at(words: &[String], today: Date, now: Timestamp) -> Option<Window> {
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let week_start = today.add_days(-i64::from(today.weekday()));
    match (w(0), w(1)) {
        ("today" | "tonight", _) => return Some(Window::day(today)),
        ("this", "morning" | "afternoon" | "evening") => return Some(Window::day(today)),
        ("day", "before") if w(2) == "yesterday" => return Some(Window::day(today.add_days(-2))),
        ("yesterday", _) | ("last", "night") => return Some(Window::day(today.add_days(-1))),
        ("this", "week") => return Some(Window::days(week_start, 7)),
        ("last" | "past" | "previous", "week") => {
            return Some(Window::days(week_start.add_days(-7), 7));
        }
        ("this", "weekend") => return Some(Window::days(week_start.add_days(5), 2)),
        ("last" | "past" | "previous", "weekend") => {
            let this_saturday = week_start.add_days(5);
            let saturday = if today >= this_saturday {
                this_saturday.add_days(-7)
            } else {
                week_start.add_days(-2)
            };
            return Some(Window::days(saturday, 2));
        }
        ("this", "month") => return Some(Window::month_of(today)),
        ("last" | "past" | "previous", "month") => {
            return Some(Window::month_of(today.month_start_offset(-1)));
        }
        ("this", "year") => return Window::year(today.year),
        ("last" | "past" | "previous", "year") => return Window::year(today.year - 1),
        ("last" | "past", n) => {
            if let (Some(n), Some(unit)) = (number(n), unit(w(2))) {
                let from = match unit {
                    Unit::Day => today.add_days(1 - n),
                    Unit::Week => today.add_days(1 - 7 * n),
                    Unit::Month => today.month_start_offset(-i32::try_from(n).ok()?),
                    Unit::Year => Date::new(today.year - i32::try_from(n).ok()?, 1, 1)?,
                };
                return Some(Window {
                    from: from.start(),
                    to: Timestamp::from_micros(now.as_micros() + 1),
                });
            }
            if let Some(day) = calendar::weekday(n) {
                // The most recent such day before today.
                let back = (i64::from(today.weekday()) - i64::from(day) + 6).rem_euclid(7) + 1;
                return Some(Window::day(today.add_days(-back)));
            }
        }
        ("on", day) => {
            if let Some(day) = calendar::weekday(day) {
                let back = (i64::from(today.weekday()) - i64::from(day)).rem_euclid(7);
                return Some(Window::day(today.add_days(-back)));
            }
        }
        _ => {}
    }
    // "3 days ago", "a couple of weeks ago", "a few months ago"
    let (n, rest) = match (w(0), w(1), w(2)) {
        ("a", "couple", "of") => (Some(2), 3),
        ("a", "few", _) => (Some(3), 2),
        (n, _, _) => (number(n), 1),
    };
    if let Some(n) = n
        && let Some(unit) = unit(w(rest))
        && w(rest + 1) == "ago"
    {
        return units_ago(today, n, unit);
    }
    // Explicit dates and months.
    let year = |s: &str| {
        s.parse::<i32>()
            .ok()
            .filter(|y| (1000..=9999).contains(y) && s.len() == 4)
    };
    if let Some(date) = calendar::parse_date(w(0)) {
        return Some(Window::day(date));
    }
    if let (Some(day), Some(month), Some(y)) =
        (calendar::ordinal(w(0)), calendar::month(w(1)), year(w(2)))
        && let Some(date) = Date::new(y, month, day)
    {
        return Some(Window::day(date));
    }
    let preposition = matches!(w(0), "in" | "during" | "since" | "of");
    let (first, offset) = if preposition { (w(1), 2) } else { (w(0), 1) };
    if let Some(month) = calendar::month(first).filter(|_| first.len() >= 3) {
        // "May 8, 2023"
        if let (Some(day), Some(y)) = (calendar::ordinal(w(offset)), year(w(offset + 1)))
            && let Some(date) = Date::new(y, month, day)
        {
            return Some(Window::day(date));
        }
        if let Some(y) = year(w(offset)) {
            return Date::new(y, month, 1).map(Window::month_of);
        }
        // "in May": the most recent May that has begun. A bare "may" is a verb.
        if preposition {
            let this_year = Date::new(today.year, month, 1)?;
            let start = if this_year <= today {
                this_year
            } else {
                Date::new(today.year - 1, month, 1)?
            };
            return Some(Window::month_of(start));
        }
    }
    if preposition && let Some(y) = year(first) {
        return Window::year(y);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> Date {
        Date::new(y, m, d).unwrap()
    }

    /// Wednesday 2023-05-17, 15:00 UTC.
    fn now() -> Timestamp {
        Timestamp::from_micros(date(2023, 5, 17).start().as_micros() + 15 * 3_600_000_000)
    }

    fn span(query: &str) -> Option<(Date, Date)> {
        window(query, now()).map(|w| (Date::of(w.from), Date::of(w.to)))
    }

    #[test]
    fn relative_days_and_weeks() {
        assert_eq!(
            span("what did I do yesterday?"),
            Some((date(2023, 5, 16), date(2023, 5, 17)))
        );
        assert_eq!(span("today"), Some((date(2023, 5, 17), date(2023, 5, 18))));
        assert_eq!(
            span("What did I do last week"),
            Some((date(2023, 5, 8), date(2023, 5, 15)))
        );
        assert_eq!(
            span("plans this week"),
            Some((date(2023, 5, 15), date(2023, 5, 22)))
        );
        assert_eq!(
            span("last weekend"),
            Some((date(2023, 5, 13), date(2023, 5, 15)))
        );
        assert_eq!(
            span("last Friday"),
            Some((date(2023, 5, 12), date(2023, 5, 13)))
        );
        assert_eq!(
            span("on Wednesday"),
            Some((date(2023, 5, 17), date(2023, 5, 18)))
        );
        assert_eq!(
            span("3 days ago"),
            Some((date(2023, 5, 14), date(2023, 5, 15)))
        );
        assert_eq!(
            span("two weeks ago"),
            Some((date(2023, 5, 1), date(2023, 5, 8)))
        );
        assert_eq!(
            span("over the past 10 days"),
            Some((date(2023, 5, 8), date(2023, 5, 17)))
        );
    }

    #[test]
    fn months_years_and_dates() {
        assert_eq!(
            span("what happened in May 2023"),
            Some((date(2023, 5, 1), date(2023, 6, 1)))
        );
        assert_eq!(
            span("trips in August"),
            Some((date(2022, 8, 1), date(2022, 9, 1)))
        );
        assert_eq!(
            span("last month"),
            Some((date(2023, 4, 1), date(2023, 5, 1)))
        );
        assert_eq!(
            span("a month ago"),
            Some((date(2023, 4, 1), date(2023, 5, 1)))
        );
        assert_eq!(span("in 2022"), Some((date(2022, 1, 1), date(2023, 1, 1))));
        assert_eq!(
            span("on 8 May, 2023"),
            Some((date(2023, 5, 8), date(2023, 5, 9)))
        );
        assert_eq!(
            span("May 8th, 2023"),
            Some((date(2023, 5, 8), date(2023, 5, 9)))
        );
        assert_eq!(
            span("2023-01-02"),
            Some((date(2023, 1, 2), date(2023, 1, 3)))
        );
    }

    #[test]
    fn no_time_expression_no_window() {
        assert_eq!(span("what is my cat's name"), None);
        assert_eq!(span("I may go hiking"), None);
        assert_eq!(span("I have 2023 stamps"), None);
        assert_eq!(span("the last one"), None);
    }
}
