//! Small validation helpers that collect every field error before answering 422.

use crate::problem::{FieldError, Problem};

#[derive(Default)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn check(&mut self, ok: bool, field: &str, message: &str) -> &mut Self {
        if !ok {
            self.0.push(FieldError::new(field, message));
        }
        self
    }
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }
    pub fn into_result(self) -> Result<(), Problem> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Problem::validation(self.0))
        }
    }
}

/// The page of a list endpoint: `limit` 1 to 100 (default 20), `offset` 0 to 1,000,000
/// (default 0); out-of-range values are recorded in `errs`.
pub fn page(errs: &mut Errors, limit: Option<i64>, offset: Option<i64>) -> (i64, i64) {
    let (limit, offset) = (limit.unwrap_or(20), offset.unwrap_or(0));
    errs.check(
        (1..=100).contains(&limit),
        "limit",
        "must be between 1 and 100",
    )
    .check(
        (0..=1_000_000).contains(&offset),
        "offset",
        "must be between 0 and 1000000",
    );
    (limit, offset)
}

/// Luhn check for card numbers (digits only, 12 to 19 of them).
pub fn luhn_valid(card: &str) -> bool {
    let n = card.len();
    if !(12..=19).contains(&n) || !card.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let sum: u32 = card
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let dd = d * 2;
                if dd > 9 { dd - 9 } else { dd }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Parses a comma-separated id list (`?ids=a,b,c`), bounded.
pub fn id_list(raw: &str, max: usize) -> Result<Vec<String>, Problem> {
    let ids: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.len() > max {
        return Err(Problem::bad_request(format!(
            "at most {max} ids per request"
        )));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn() {
        assert!(luhn_valid("4242424242424242"));
        assert!(luhn_valid("4000000000000002"));
        assert!(!luhn_valid("4242424242424241"));
        assert!(!luhn_valid("42424242"));
        assert!(!luhn_valid("4242-4242-4242-4242"));
    }

    #[test]
    fn ids() {
        assert_eq!(id_list("a, b,,c", 3).unwrap(), vec!["a", "b", "c"]);
        assert!(id_list("a,b,c,d", 3).is_err());
    }
}
