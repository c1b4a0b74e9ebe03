//! The built-in procedural domains: generators, solvers and verifiers.
//!
//! Each domain can both *generate* an item from a seeded RNG and *solve* a prompt written in
//! its format. Generators compute their answer from the values they drew; solvers parse the
//! text. The tests check that the two agree, and solvers also let the pipeline check problems
//! that came from elsewhere (docs/DESIGN.md §1, stage 1: "generated problems are checked by the verifier
//! before use").

mod arithmetic;
mod program;
mod strings;

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Item, TaskError, Verifier};

/// How hard generated items are: 1 (easiest) to 5 (hardest).
///
/// The level sets sizes, e.g. the number of digits of an operand, the length of a string or
/// the number of statements of a program; each domain documents what it controls. Every
/// domain has at least a few hundred distinct prompts at level 1 (`parity` has the fewest,
/// 448), which limits how many items of one split [`super::sample`] can find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Difficulty(u32);

impl Difficulty {
    /// The easiest level.
    pub const MIN: Difficulty = Difficulty(1);
    /// The hardest level.
    pub const MAX: Difficulty = Difficulty(5);

    /// The difficulty of `level`, which must lie in `MIN..=MAX`.
    pub fn new(level: u32) -> Result<Difficulty, TaskError> {
        if (Self::MIN.0..=Self::MAX.0).contains(&level) {
            Ok(Difficulty(level))
        } else {
            Err(TaskError::BadDifficulty {
                level,
                min: Self::MIN.0,
                max: Self::MAX.0,
            })
        }
    }

    /// The level as a number, 1 to 5.
    pub fn level(self) -> u32 {
        self.0
    }

    /// Every level from easiest to hardest.
    pub fn all() -> impl Iterator<Item = Difficulty> {
        (Self::MIN.0..=Self::MAX.0).map(Difficulty)
    }
}

impl TryFrom<u32> for Difficulty {
    type Error = TaskError;

    fn try_from(level: u32) -> Result<Self, TaskError> {
        Difficulty::new(level)
    }
}

impl From<Difficulty> for u32 {
    fn from(difficulty: Difficulty) -> u32 {
        difficulty.0
    }
}

impl fmt::Display for Difficulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A built-in task domain. Serialized as its [`name`](Domain::name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    /// Addition of non-negative integers, `12+345=` → `357`. Level L: the longer operand has
    /// L+1 digits, the other 1 to L+1.
    Add,
    /// Subtraction, possibly negative, `12-345=` → `-333`. Level as for `add`.
    Sub,
    /// Multiplication, `12*34=` → `408`. Levels 1 to 5: 2×1, 2×2, 3×2, 3×3, 4×3 digits.
    Mul,
    /// Which number is larger, `123 vs 45?` → `>` (or `<`, `=`). Level L: L+1 digits as for
    /// `add`; a fifth of the pairs are equal and three tenths differ in a single digit.
    Compare,
    /// The next integer, `next 199=` → `200`. Level L: up to L+2 digits, half of them ending
    /// in a run of 9s so that the carry matters.
    Successor,
    /// Unit conversion with an integer result, `3 km in m?` → `3000`. Units of length
    /// (mm, cm, m, km), mass (mg, g, kg) and time (s, min, h, day). Level L: values of up to
    /// L+1 digits; levels 1-2 convert to the next smaller unit, 3 to any smaller unit, 4-5
    /// also upwards (`5000 m in km?` → `5`).
    Convert,
    /// Evaluate a straight-line program, `a=3;b=a+2;b?` → `5`. Level L: L+1 statements over
    /// up to 4 variables, the first a constant 0-99; `x+N`, `x-N` at level 1, `x+y`, `x-y`
    /// from 2, re-assignment and querying any variable from 3, `x*N` from 4. Usual
    /// precedence, no unary minus.
    Program,
    /// Reverse a lowercase string, `rev abc=` → `cba`. Level L: L+1 to 2L+2 letters.
    Reverse,
    /// Repeat a lowercase string, `copy abc=` → `abc`. Lengths as for `reverse`.
    Copy,
    /// Sort digits ascending, `sort 3142=` → `1234`. Lengths as for `reverse`.
    Sort,
    /// Count a letter, `count a in banana?` → `3`. Level L: L+3 to 2L+3 letters drawn from
    /// the first L+2 letters of the alphabet.
    Count,
    /// Whether `()[]` brackets are balanced, `bal ([)]?` → `no` (or `yes`). Level L: 1 to
    /// L+2 pairs; half the strings get one corruption (a flipped, retyped or swapped bracket)
    /// that keeps the length, so counting is not enough.
    Brackets,
    /// Parity of the number of 1 bits, `par 1011?` → `odd` (or `even`). Level L: L+5 to
    /// 2L+6 bits.
    Parity,
}

impl Domain {
    /// Every built-in domain, in a fixed order.
    pub const ALL: [Domain; 13] = [
        Domain::Add,
        Domain::Sub,
        Domain::Mul,
        Domain::Compare,
        Domain::Successor,
        Domain::Convert,
        Domain::Program,
        Domain::Reverse,
        Domain::Copy,
        Domain::Sort,
        Domain::Count,
        Domain::Brackets,
        Domain::Parity,
    ];

    /// The domain's name, as used in [`Item::domain`], on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Domain::Add => "add",
            Domain::Sub => "sub",
            Domain::Mul => "mul",
            Domain::Compare => "compare",
            Domain::Successor => "successor",
            Domain::Convert => "convert",
            Domain::Program => "program",
            Domain::Reverse => "reverse",
            Domain::Copy => "copy",
            Domain::Sort => "sort",
            Domain::Count => "count",
            Domain::Brackets => "brackets",
            Domain::Parity => "parity",
        }
    }

    /// The domain called `name`; the error lists every valid name.
    pub fn by_name(name: &str) -> Result<Domain, TaskError> {
        Domain::ALL
            .into_iter()
            .find(|domain| domain.name() == name)
            .ok_or_else(|| TaskError::UnknownDomain {
                name: name.to_string(),
                valid: Domain::ALL.map(Domain::name).join(", "),
            })
    }

    /// Draws one item at `difficulty`. The same RNG state always gives the same item.
    pub fn generate<R: Rng + ?Sized>(self, rng: &mut R, difficulty: Difficulty) -> Item {
        let level = difficulty.level();
        let (prompt, answer) = match self {
            Domain::Add => arithmetic::generate_add(rng, level),
            Domain::Sub => arithmetic::generate_sub(rng, level),
            Domain::Mul => arithmetic::generate_mul(rng, level),
            Domain::Compare => arithmetic::generate_compare(rng, level),
            Domain::Successor => arithmetic::generate_successor(rng, level),
            Domain::Convert => arithmetic::generate_convert(rng, level),
            Domain::Program => program::generate(rng, level),
            Domain::Reverse => strings::generate_reverse(rng, level),
            Domain::Copy => strings::generate_copy(rng, level),
            Domain::Sort => strings::generate_sort(rng, level),
            Domain::Count => strings::generate_count(rng, level),
            Domain::Brackets => strings::generate_brackets(rng, level),
            Domain::Parity => strings::generate_parity(rng, level),
        };
        Item {
            prompt,
            answer,
            domain: self.name().to_string(),
        }
    }

    /// The reference answer of a prompt written in this domain's format, or `None` when the
    /// prompt is not in that format (or, for `convert`, has no integer answer; for `program`,
    /// reads an unassigned variable or overflows `i64`).
    pub fn solve(self, prompt: &str) -> Option<String> {
        match self {
            Domain::Add => arithmetic::solve_add(prompt),
            Domain::Sub => arithmetic::solve_sub(prompt),
            Domain::Mul => arithmetic::solve_mul(prompt),
            Domain::Compare => arithmetic::solve_compare(prompt),
            Domain::Successor => arithmetic::solve_successor(prompt),
            Domain::Convert => arithmetic::solve_convert(prompt),
            Domain::Program => program::solve(prompt),
            Domain::Reverse => strings::solve_reverse(prompt),
            Domain::Copy => strings::solve_copy(prompt),
            Domain::Sort => strings::solve_sort(prompt),
            Domain::Count => strings::solve_count(prompt),
            Domain::Brackets => strings::solve_brackets(prompt),
            Domain::Parity => strings::solve_parity(prompt),
        }
    }

    /// How this domain's answers are checked: numeric (tolerance 0) for numbers, a choice for
    /// `compare`, `brackets` and `parity`, exact for strings.
    pub fn verifier(self) -> Verifier {
        let choice =
            |options: &[&str]| Verifier::Choice(options.iter().map(|o| o.to_string()).collect());
        match self {
            Domain::Add
            | Domain::Sub
            | Domain::Mul
            | Domain::Successor
            | Domain::Convert
            | Domain::Program
            | Domain::Count => Verifier::Numeric { tolerance: 0.0 },
            Domain::Compare => choice(&["<", ">", "="]),
            Domain::Brackets => choice(&["yes", "no"]),
            Domain::Parity => choice(&["even", "odd"]),
            Domain::Reverse | Domain::Copy | Domain::Sort => Verifier::Exact,
        }
    }

    /// Whether `candidate` answers a prompt whose reference answer is `expected`, by this
    /// domain's [`verifier`](Domain::verifier).
    pub fn verify(self, expected: &str, candidate: &str) -> bool {
        self.verifier().verify(expected, candidate)
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Domain {
    type Err = TaskError;

    fn from_str(name: &str) -> Result<Domain, TaskError> {
        Domain::by_name(name)
    }
}

impl Domain {
    /// The domains named in `names` (surrounding spaces ignored), in order; every domain when
    /// `names` is `None`.
    pub fn list<S: AsRef<str>>(names: Option<&[S]>) -> Result<Vec<Domain>, TaskError> {
        match names {
            Some(names) => names
                .iter()
                .map(|n| Domain::by_name(n.as_ref().trim()))
                .collect(),
            None => Ok(Domain::ALL.to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::tasks::{MAX_ANSWER_CHARS, MAX_PROMPT_CHARS};

    /// A wrong answer close to the right one: a neighbouring number, the other choice, or a
    /// string with one character changed.
    fn perturbed(domain: Domain, answer: &str) -> String {
        match domain.verifier() {
            Verifier::Numeric { .. } => {
                let value: i64 = answer.parse().unwrap();
                (value + 1).to_string()
            }
            Verifier::Choice(options) => options.into_iter().find(|o| o != answer).unwrap(),
            Verifier::Exact | Verifier::Regex(_) => {
                let mut chars: Vec<char> = answer.chars().collect();
                chars[0] = if chars[0] == 'x' { 'y' } else { 'x' };
                chars.into_iter().collect()
            }
        }
    }

    #[test]
    fn generated_answers_verify_and_wrong_ones_do_not() {
        for domain in Domain::ALL {
            for difficulty in Difficulty::all() {
                let mut rng = StdRng::seed_from_u64(u64::from(difficulty.level()));
                for _ in 0..500 {
                    let item = domain.generate(&mut rng, difficulty);
                    let context = format!("{domain} level {difficulty}: {item:?}");
                    assert_eq!(item.domain, domain.name());
                    assert_eq!(
                        domain.solve(&item.prompt).as_deref(),
                        Some(item.answer.as_str()),
                        "solver disagrees with generator, {context}"
                    );
                    assert!(domain.verify(&item.answer, &item.answer), "{context}");
                    assert!(
                        domain.verify(&item.answer, &format!(" {}\n", item.answer)),
                        "{context}"
                    );
                    assert!(
                        !domain.verify(&item.answer, &format!("{}1", item.answer)),
                        "{context}"
                    );
                    assert!(
                        !domain.verify(&item.answer, &perturbed(domain, &item.answer)),
                        "{context}"
                    );
                    assert!(!domain.verify(&item.answer, ""), "{context}");
                }
            }
        }
    }

    #[test]
    fn prompts_and_answers_stay_short_ascii() {
        for domain in Domain::ALL {
            for difficulty in Difficulty::all() {
                let mut rng = StdRng::seed_from_u64(99);
                let mut longest = (0, 0);
                for _ in 0..3000 {
                    let item = domain.generate(&mut rng, difficulty);
                    let printable = |s: &str| s.bytes().all(|b| (b' '..=b'~').contains(&b));
                    assert!(
                        printable(&item.prompt) && printable(&item.answer),
                        "{item:?}"
                    );
                    assert!(
                        item.prompt.ends_with('=') || item.prompt.ends_with('?'),
                        "{item:?}"
                    );
                    assert!(!item.answer.is_empty(), "{item:?}");
                    longest.0 = longest.0.max(item.prompt.len());
                    longest.1 = longest.1.max(item.answer.len());
                }
                assert!(
                    longest.0 <= MAX_PROMPT_CHARS && longest.1 <= MAX_ANSWER_CHARS,
                    "{domain} level {difficulty}: longest prompt {}, answer {}",
                    longest.0,
                    longest.1
                );
            }
        }
    }

    #[test]
    fn harder_levels_give_longer_prompts() {
        for domain in Domain::ALL {
            let mean_len = |level: u32| {
                let mut rng = StdRng::seed_from_u64(5);
                let difficulty = Difficulty::new(level).unwrap();
                (0..1000)
                    .map(|_| domain.generate(&mut rng, difficulty).prompt.len())
                    .sum::<usize>()
            };
            assert!(mean_len(5) > mean_len(1), "{domain}");
        }
    }

    #[test]
    fn every_answer_kind_occurs() {
        let mut rng = StdRng::seed_from_u64(3);
        for domain in Domain::ALL {
            if let Verifier::Choice(options) = domain.verifier() {
                for difficulty in Difficulty::all() {
                    let answers: Vec<String> = (0..300)
                        .map(|_| domain.generate(&mut rng, difficulty).answer)
                        .collect();
                    for option in &options {
                        let share = answers.iter().filter(|a| *a == option).count();
                        assert!(
                            share >= 30,
                            "{domain} level {difficulty}: `{option}` {share}/300"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for domain in Domain::ALL {
            assert_eq!(Domain::by_name(domain.name()).unwrap(), domain);
            assert_eq!(domain.to_string().parse::<Domain>().unwrap(), domain);
            let json = serde_json::to_string(&domain).unwrap();
            assert_eq!(json, format!("\"{}\"", domain.name()));
        }
        let err = Domain::by_name("addition").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("`addition`"), "{message}");
        for domain in Domain::ALL {
            assert!(message.contains(domain.name()), "{message}");
        }
    }

    #[test]
    fn difficulty_is_range_checked() {
        assert_eq!(Difficulty::new(3).unwrap().level(), 3);
        assert!(matches!(
            Difficulty::new(0),
            Err(TaskError::BadDifficulty {
                level: 0,
                min: 1,
                max: 5
            })
        ));
        assert!(Difficulty::new(6).is_err());
        assert_eq!(Difficulty::all().count(), 5);
        assert_eq!(serde_json::to_string(&Difficulty::MAX).unwrap(), "5");
        assert!(serde_json::from_str::<Difficulty>("9").is_err());
    }

    #[test]
    fn hand_checked_cases() {
        let cases: &[(Domain, &str, Option<&str>)] = &[
            (Domain::Add, "12+345=", Some("357")),
            (Domain::Add, "99999+99999=", Some("199998")),
            (Domain::Add, "12+-3=", None),
            (Domain::Sub, "12-345=", Some("-333")),
            (Domain::Sub, "7-7=", Some("0")),
            (Domain::Mul, "12*34=", Some("408")),
            (Domain::Mul, "999*999=", Some("998001")),
            (Domain::Compare, "123 vs 45?", Some(">")),
            (Domain::Compare, "45 vs 123?", Some("<")),
            (Domain::Compare, "0 vs 0?", Some("=")),
            (Domain::Compare, "123 vs 45=", None),
            (Domain::Successor, "next 199=", Some("200")),
            (Domain::Successor, "next 0=", Some("1")),
            (Domain::Convert, "3 km in m?", Some("3000")),
            (Domain::Convert, "2 h in s?", Some("7200")),
            (Domain::Convert, "5000 m in km?", Some("5")),
            (Domain::Convert, "3 day in min?", Some("4320")),
            (Domain::Convert, "7 mg in g?", None),
            (Domain::Convert, "3 km in kg?", None),
            (Domain::Program, "a=3;b=a+2;b?", Some("5")),
            (Domain::Reverse, "rev abc=", Some("cba")),
            (Domain::Copy, "copy abc=", Some("abc")),
            (Domain::Sort, "sort 3142=", Some("1234")),
            (Domain::Count, "count a in banana?", Some("3")),
            (Domain::Count, "count z in banana?", Some("0")),
            (Domain::Brackets, "bal (()[])?", Some("yes")),
            (Domain::Brackets, "bal ([)]?", Some("no")),
            (Domain::Brackets, "bal (()?", Some("no")),
            (Domain::Brackets, "bal )(?", Some("no")),
            (Domain::Parity, "par 1011?", Some("odd")),
            (Domain::Parity, "par 1001?", Some("even")),
            (Domain::Parity, "par 1021?", None),
        ];
        for (domain, prompt, answer) in cases {
            assert_eq!(
                domain.solve(prompt).as_deref(),
                *answer,
                "{domain}: {prompt}"
            );
        }
    }
}
