//! Parsing of human durations such as `30s`, `2m` or `1h`.

use thiserror::Error;

/// A duration flag that was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DurationError {
    /// The text is not a duration at all.
    #[error(
        "invalid duration {input:?}: expected a number of seconds or a number followed by s, m or h"
    )]
    Invalid {
        /// The text that was rejected.
        input: String,
    },
    /// A well-formed duration of zero.
    #[error("the duration must be greater than 0")]
    Zero {
        /// The text that was rejected.
        input: String,
    },
}

/// Parses `90`, `90s`, `5m` or `1h` into whole seconds; zero is rejected because a
/// zero-length run would have nothing to measure.
pub fn parse_secs(input: &str) -> Result<u64, DurationError> {
    let err = || DurationError::Invalid {
        input: input.to_string(),
    };
    let text = input.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        Some(_) => (text, 's'),
        None => return Err(err()),
    };
    let value: u64 = digits.parse().map_err(|_| err())?;
    let multiplier = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        _ => return Err(err()),
    };
    match value.checked_mul(multiplier) {
        Some(0) => Err(DurationError::Zero {
            input: input.to_string(),
        }),
        Some(secs) => Ok(secs),
        None => Err(err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_units_and_bare_seconds() {
        assert_eq!(parse_secs("90"), Ok(90));
        assert_eq!(parse_secs("3s"), Ok(3));
        assert_eq!(parse_secs("2m"), Ok(120));
        assert_eq!(parse_secs(" 1h "), Ok(3600));
    }

    #[test]
    fn rejects_garbage_zero_and_unknown_units() {
        for bad in ["", "s", "abc", "0", "0s", "5d", "-3s", "1.5m"] {
            assert!(parse_secs(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn zero_is_reported_as_zero_not_as_malformed() {
        for zero in ["0", "0s", "00m", " 0h"] {
            let e = parse_secs(zero).unwrap_err();
            assert!(matches!(e, DurationError::Zero { .. }), "{zero:?}: {e:?}");
            assert!(e.to_string().contains("must be greater than 0"), "{e}");
        }
        assert!(matches!(
            parse_secs("5d"),
            Err(DurationError::Invalid { .. })
        ));
    }
}
