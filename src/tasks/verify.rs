//! Verifiers: how a candidate answer is compared with the reference answer.
//!
//! Every verifier trims surrounding whitespace from both sides first, so `" 46 "` and `"46"`
//! are the same answer. The reward of Stage 2 is +1 when [`Verifier::verify`] accepts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::dataset::LineProblem;
use super::TaskError;

/// How answers of one dataset or domain are checked.
///
/// Written as text (for the command line, [`FromStr`]): `exact`, `numeric` (tolerance 0),
/// `numeric:0.01`, `choice:yes,no`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verifier {
    /// The trimmed candidate must equal the trimmed reference, byte for byte (case matters).
    Exact,
    /// Both sides are read as numbers and must differ by at most `tolerance` (absolute).
    ///
    /// Integers are compared exactly as integers (no rounding through `f64`), anything else as
    /// finite `f64`. Decision: leading zeros and a `+` sign are accepted (`"046"` matches
    /// `"46"`, `"-0"` matches `"0"`) because the value is what the task asks for; the built-in
    /// generators never write them, so training still teaches the canonical form. Thousands
    /// separators (`"1,000"`), `inf` and `NaN` are never numbers.
    Numeric {
        /// Largest accepted absolute difference; `0.0` for exact integer answers.
        tolerance: f64,
    },
    /// A multiple-choice answer: the candidate must equal the reference ignoring ASCII case.
    /// The options list every valid answer; a dataset whose reference answer is not one of them
    /// is rejected when loaded.
    Choice(Vec<String>),
    /// A regular expression the whole trimmed candidate must match; `{answer}` in the pattern
    /// stands for the reference answer, escaped (e.g. `(?i){answer}\.?` accepts `"46."` for
    /// `46`). Written `regex:PATTERN`.
    Regex(String),
}

/// Compile a [`Verifier::Regex`] pattern for `expected`, anchored at both ends.
fn compile_regex(pattern: &str, expected: &str) -> Result<regex::Regex, regex::Error> {
    let p = pattern.replace("{answer}", &regex::escape(expected));
    regex::Regex::new(&format!("^(?:{p})$"))
}

impl Verifier {
    /// Whether `candidate` is an acceptable answer when `expected` is the reference.
    pub fn verify(&self, expected: &str, candidate: &str) -> bool {
        let expected = expected.trim();
        let candidate = candidate.trim();
        match self {
            Verifier::Exact => expected == candidate,
            Verifier::Numeric { tolerance } => {
                match (parse_number(expected), parse_number(candidate)) {
                    (Some(e), Some(c)) => e.distance(c) <= *tolerance,
                    _ => false,
                }
            }
            Verifier::Choice(_) => expected.eq_ignore_ascii_case(candidate),
            Verifier::Regex(pattern) => {
                compile_regex(pattern, expected).is_ok_and(|re| re.is_match(candidate))
            }
        }
    }

    /// Checks that the verifier itself can work: a finite, non-negative tolerance, or a
    /// non-empty list of distinct, non-empty options.
    pub fn validate(&self) -> Result<(), TaskError> {
        let bad = |reason: &str| TaskError::BadVerifier {
            spec: self.to_string(),
            reason: reason.to_string(),
        };
        match self {
            Verifier::Exact => Ok(()),
            Verifier::Regex(pattern) => compile_regex(pattern, "0")
                .map(|_| ())
                .map_err(|e| bad(&format!("not a valid regular expression: {e}"))),
            Verifier::Numeric { tolerance } => {
                if tolerance.is_finite() && *tolerance >= 0.0 {
                    Ok(())
                } else {
                    Err(bad("the tolerance must be a finite number >= 0"))
                }
            }
            Verifier::Choice(options) => {
                if options.is_empty() {
                    return Err(bad("list at least one option, e.g. `choice:yes,no`"));
                }
                for (i, option) in options.iter().enumerate() {
                    let option = option.trim();
                    if option.is_empty() {
                        return Err(bad("options must not be empty"));
                    }
                    if options[..i]
                        .iter()
                        .any(|earlier| earlier.trim().eq_ignore_ascii_case(option))
                    {
                        return Err(bad(&format!(
                            "option `{option}` is listed twice (options ignore case)"
                        )));
                    }
                }
                Ok(())
            }
        }
    }

    /// Checks that a reference answer can ever be accepted by this verifier.
    pub(super) fn check_reference(&self, answer: &str) -> Result<(), LineProblem> {
        match self {
            Verifier::Exact | Verifier::Regex(_) => Ok(()),
            Verifier::Numeric { .. } => match parse_number(answer.trim()) {
                Some(_) => Ok(()),
                None => Err(LineProblem::AnswerNotNumeric {
                    answer: answer.to_string(),
                }),
            },
            Verifier::Choice(options) => {
                if options
                    .iter()
                    .any(|option| option.trim().eq_ignore_ascii_case(answer.trim()))
                {
                    Ok(())
                } else {
                    Err(LineProblem::AnswerNotAChoice {
                        answer: answer.to_string(),
                        options: options.join(","),
                    })
                }
            }
        }
    }
}

impl fmt::Display for Verifier {
    /// Writes the textual form that [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verifier::Exact => write!(f, "exact"),
            Verifier::Numeric { tolerance } => write!(f, "numeric:{tolerance}"),
            Verifier::Choice(options) => write!(f, "choice:{}", options.join(",")),
            Verifier::Regex(pattern) => write!(f, "regex:{pattern}"),
        }
    }
}

impl FromStr for Verifier {
    type Err = TaskError;

    /// Reads `exact`, `numeric`, `numeric:TOLERANCE` or `choice:A,B,...`.
    fn from_str(spec: &str) -> Result<Self, TaskError> {
        let bad = |reason: &str| TaskError::BadVerifier {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (kind, argument) = match spec.trim().split_once(':') {
            Some((kind, argument)) => (kind, Some(argument)),
            None => (spec.trim(), None),
        };
        let verifier = match (kind, argument) {
            ("exact", None) => Verifier::Exact,
            ("numeric", None) => Verifier::Numeric { tolerance: 0.0 },
            ("numeric", Some(tolerance)) => Verifier::Numeric {
                tolerance: tolerance
                    .trim()
                    .parse()
                    .map_err(|_| bad("the tolerance after `numeric:` must be a number"))?,
            },
            ("choice", Some(options)) => {
                Verifier::Choice(options.split(',').map(|o| o.trim().to_string()).collect())
            }
            ("regex", Some(pattern)) => Verifier::Regex(pattern.to_string()),
            ("regex", None) => return Err(bad("give the pattern, e.g. `regex:(?i){answer}`")),
            ("exact", Some(_)) => return Err(bad("`exact` takes no argument")),
            ("choice", None) => return Err(bad("list the options, e.g. `choice:yes,no`")),
            _ => {
                return Err(bad(
                    "expected `exact`, `numeric`, `numeric:TOLERANCE`, `choice:A,B,...` or \
                     `regex:PATTERN`",
                ))
            }
        };
        verifier.validate().map_err(|_| match &verifier {
            Verifier::Numeric { .. } => bad("the tolerance must be a finite number >= 0"),
            Verifier::Regex(_) => bad("not a valid regular expression"),
            _ => bad("options must be non-empty and distinct, e.g. `choice:yes,no`"),
        })?;
        Ok(verifier)
    }
}

/// A parsed numeric answer: integers stay exact, everything else is a finite `f64`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Number {
    Integer(i128),
    Real(f64),
}

impl Number {
    fn as_f64(self) -> f64 {
        match self {
            Number::Integer(i) => i as f64,
            Number::Real(x) => x,
        }
    }

    fn distance(self, other: Number) -> f64 {
        match (self, other) {
            (Number::Integer(a), Number::Integer(b)) => match a.checked_sub(b) {
                Some(d) => d.unsigned_abs() as f64,
                None => f64::INFINITY,
            },
            _ => (self.as_f64() - other.as_f64()).abs(),
        }
    }
}

/// Reads a decimal number: optional sign, digits, optional fraction and exponent.
fn parse_number(text: &str) -> Option<Number> {
    // `f64::from_str` also reads `inf`, `nan` and `infinity`; only plain decimals are answers.
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
        && text.bytes().any(|b| b.is_ascii_digit());
    if !plain {
        return None;
    }
    if let Ok(i) = text.parse::<i128>() {
        return Some(Number::Integer(i));
    }
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() => Some(Number::Real(x)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_trims_but_keeps_case() {
        let v = Verifier::Exact;
        assert!(v.verify("cba", "  cba \t"));
        assert!(!v.verify("cba", "CBA"));
        assert!(!v.verify("cba", "cba1"));
        assert!(!v.verify("cba", ""));
    }

    #[test]
    fn numeric_compares_values() {
        let v = Verifier::Numeric { tolerance: 0.0 };
        assert!(v.verify("46", "46"));
        assert!(v.verify("46", " 046\n"), "leading zeros are accepted");
        assert!(v.verify("46", "+46"));
        assert!(v.verify("0", "-0"));
        assert!(v.verify("-26", "-26"));
        assert!(v.verify("3000", "3e3"));
        assert!(v.verify("46", "46.0"));
        assert!(!v.verify("46", "461"));
        assert!(!v.verify("46", "47"));
        assert!(!v.verify("-26", "26"));
        assert!(!v.verify("46", "forty-six"));
        assert!(!v.verify("46", ""));
        assert!(!v.verify("1000", "1,000"));
        assert!(!v.verify("46", "inf"));
        assert!(!v.verify("46", "NaN"));
        // Integers beyond 2^53 are compared exactly, not through f64.
        assert!(!v.verify("9007199254740993", "9007199254740992"));
    }

    #[test]
    fn numeric_tolerance_is_absolute() {
        let v = Verifier::Numeric { tolerance: 0.01 };
        assert!(v.verify("3.14159", "3.14"));
        assert!(v.verify("3.14159", "3.15"));
        assert!(!v.verify("3.14159", "3.13"));
    }

    #[test]
    fn choice_ignores_case() {
        let v = Verifier::Choice(vec!["yes".into(), "no".into()]);
        assert!(v.verify("yes", "YES "));
        assert!(!v.verify("yes", "no"));
        assert!(!v.verify("yes", "yes1"));
    }

    #[test]
    fn parses_and_prints_specs() {
        for (spec, verifier) in [
            ("exact", Verifier::Exact),
            ("numeric", Verifier::Numeric { tolerance: 0.0 }),
            ("numeric:0.5", Verifier::Numeric { tolerance: 0.5 }),
            (
                "choice:A, B,C",
                Verifier::Choice(vec!["A".into(), "B".into(), "C".into()]),
            ),
        ] {
            let parsed: Verifier = spec.parse().unwrap();
            assert_eq!(parsed, verifier, "{spec}");
            assert_eq!(parsed.to_string().parse::<Verifier>().unwrap(), verifier);
        }
        for bad in [
            "regex",
            "numeric:x",
            "numeric:-1",
            "numeric:inf",
            "choice",
            "choice:",
            "choice:a,A",
            "exact:1",
        ] {
            let err = bad.parse::<Verifier>().unwrap_err();
            assert!(
                matches!(&err, TaskError::BadVerifier { spec, .. } if spec == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn reference_answers_are_checked() {
        let numeric = Verifier::Numeric { tolerance: 0.0 };
        assert!(numeric.check_reference("12").is_ok());
        assert!(matches!(
            numeric.check_reference("twelve"),
            Err(LineProblem::AnswerNotNumeric { .. })
        ));
        let choice = Verifier::Choice(vec!["A".into(), "B".into()]);
        assert!(choice.check_reference("b").is_ok());
        assert!(matches!(
            choice.check_reference("C"),
            Err(LineProblem::AnswerNotAChoice { .. })
        ));
    }
}

#[cfg(test)]
mod regex_tests {
    use super::*;

    #[test]
    fn regex_verifier_matches_whole_answers() {
        let v: Verifier = "regex:(?i){answer}\\.?".parse().unwrap();
        assert!(v.verify("46", "46."));
        assert!(
            v.verify("a+b", "A+B"),
            "the answer is escaped, case-insensitive by flag"
        );
        assert!(!v.verify("46", "146"), "anchored at both ends");
        assert!(!v.verify("46", "46.."));
        let yes: Verifier = "regex:y(es)?".parse().unwrap();
        assert!(yes.verify("ignored", "yes") && yes.verify("x", "y") && !yes.verify("x", "no"));
        let e = "regex:(".parse::<Verifier>().unwrap_err().to_string();
        assert!(e.contains("regular expression"), "{e}");
        assert_eq!(v.to_string().parse::<Verifier>().unwrap(), v);
    }
}
