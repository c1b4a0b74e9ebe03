//! Numeric domains: add, sub, mul, compare, successor, convert.
//!
//! Generators return `(prompt, answer)`; solvers parse a prompt and return its answer.

use std::cmp::Ordering;

use rand::Rng;

/// A number with exactly `digits` decimal digits; 0 to 9 when `digits` is 1.
pub(super) fn exact_digits<R: Rng + ?Sized>(rng: &mut R, digits: u32) -> u64 {
    if digits <= 1 {
        return rng.gen_range(0..10);
    }
    let low = 10u64.pow(digits - 1);
    rng.gen_range(low..low * 10)
}

/// Two operands: one with exactly `digits` digits, the other with 1 to `digits`, in random
/// order, so that the level bounds the longest operand but lengths still vary.
fn operands<R: Rng + ?Sized>(rng: &mut R, digits: u32) -> (u64, u64) {
    let long = exact_digits(rng, digits);
    let short_digits = rng.gen_range(1..=digits);
    let short = exact_digits(rng, short_digits);
    if rng.gen_bool(0.5) {
        (long, short)
    } else {
        (short, long)
    }
}

/// A non-negative decimal integer made only of ASCII digits (no sign, no spaces).
fn parse_unsigned(text: &str) -> Option<u64> {
    // 18 digits always fit in a u64, so the checked arithmetic below is the only overflow guard.
    if text.is_empty() || text.len() > 18 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Reads `A{operator}B{end}` into (A, B).
fn binary(prompt: &str, operator: char, end: char) -> Option<(u64, u64)> {
    let (a, b) = prompt.strip_suffix(end)?.split_once(operator)?;
    Some((parse_unsigned(a)?, parse_unsigned(b)?))
}

pub(super) fn generate_add<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let (a, b) = operands(rng, level + 1);
    (format!("{a}+{b}="), (a + b).to_string())
}

pub(super) fn solve_add(prompt: &str) -> Option<String> {
    let (a, b) = binary(prompt, '+', '=')?;
    Some(a.checked_add(b)?.to_string())
}

pub(super) fn generate_sub<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let (a, b) = operands(rng, level + 1);
    (
        format!("{a}-{b}="),
        (i128::from(a) - i128::from(b)).to_string(),
    )
}

pub(super) fn solve_sub(prompt: &str) -> Option<String> {
    let (a, b) = binary(prompt, '-', '=')?;
    Some((i128::from(a) - i128::from(b)).to_string())
}

pub(super) fn generate_mul<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    // Products grow twice as fast as sums: cap at 4×3 digits so the answer stays ≤ 7 chars.
    let (long, short) = match level {
        1 => (2, 1),
        2 => (2, 2),
        3 => (3, 2),
        4 => (3, 3),
        _ => (4, 3),
    };
    let a = exact_digits(rng, long);
    let b = exact_digits(rng, short);
    let (a, b) = if rng.gen_bool(0.5) { (a, b) } else { (b, a) };
    (format!("{a}*{b}="), (a * b).to_string())
}

pub(super) fn solve_mul(prompt: &str) -> Option<String> {
    let (a, b) = binary(prompt, '*', '=')?;
    Some(a.checked_mul(b)?.to_string())
}

/// `<`, `>` or `=` for the first number against the second.
fn comparison_symbol(a: u64, b: u64) -> &'static str {
    match a.cmp(&b) {
        Ordering::Less => "<",
        Ordering::Greater => ">",
        Ordering::Equal => "=",
    }
}

/// `number` (of exactly `digits` digits) with one digit replaced by a different one, keeping
/// the leading digit non-zero.
fn change_one_digit<R: Rng + ?Sized>(rng: &mut R, number: u64, digits: u32) -> u64 {
    let position = rng.gen_range(0..digits); // 0 = least significant
    let place = 10u64.pow(position);
    let old = (number / place) % 10;
    let new = if position + 1 == digits {
        // Leading digit: one of 1..=9 other than `old` (which is itself in 1..=9).
        let pick = rng.gen_range(1..9);
        if pick >= old {
            pick + 1
        } else {
            pick
        }
    } else {
        (old + rng.gen_range(1..10)) % 10
    };
    number - old * place + new * place
}

pub(super) fn generate_compare<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    // Without forcing them, equal and near-equal pairs would be rare and `=` never learned.
    let digits = level + 1;
    let (a, b) = match rng.gen_range(0..10) {
        0 | 1 => {
            let a = exact_digits(rng, digits);
            (a, a)
        }
        2..=4 => {
            let a = exact_digits(rng, digits);
            (a, change_one_digit(rng, a, digits))
        }
        _ => operands(rng, digits),
    };
    (format!("{a} vs {b}?"), comparison_symbol(a, b).to_string())
}

pub(super) fn solve_compare(prompt: &str) -> Option<String> {
    let (a, b) = prompt.strip_suffix('?')?.split_once(" vs ")?;
    Some(comparison_symbol(parse_unsigned(a)?, parse_unsigned(b)?).to_string())
}

pub(super) fn generate_successor<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let digits = rng.gen_range(1..=level + 2);
    let mut n = exact_digits(rng, digits);
    if rng.gen_bool(0.5) {
        // End in a run of 9s so the answer needs a carry chain.
        let nines = rng.gen_range(1..=digits);
        let place = 10u64.pow(nines);
        n = n / place * place + (place - 1);
    }
    (format!("next {n}="), (n + 1).to_string())
}

pub(super) fn solve_successor(prompt: &str) -> Option<String> {
    let n = parse_unsigned(prompt.strip_prefix("next ")?.strip_suffix('=')?)?;
    Some(n.checked_add(1)?.to_string())
}

/// A unit and its size in the dimension's smallest unit.
struct Unit {
    name: &'static str,
    size: u64,
}

/// Units per dimension, smallest first. Names are unique across dimensions.
const DIMENSIONS: [&[Unit]; 3] = [
    &[
        Unit {
            name: "mm",
            size: 1,
        },
        Unit {
            name: "cm",
            size: 10,
        },
        Unit {
            name: "m",
            size: 1_000,
        },
        Unit {
            name: "km",
            size: 1_000_000,
        },
    ],
    &[
        Unit {
            name: "mg",
            size: 1,
        },
        Unit {
            name: "g",
            size: 1_000,
        },
        Unit {
            name: "kg",
            size: 1_000_000,
        },
    ],
    &[
        Unit { name: "s", size: 1 },
        Unit {
            name: "min",
            size: 60,
        },
        Unit {
            name: "h",
            size: 3_600,
        },
        Unit {
            name: "day",
            size: 86_400,
        },
    ],
];

pub(super) fn generate_convert<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let units = DIMENSIONS[rng.gen_range(0..DIMENSIONS.len())];
    let (small, big) = if level <= 2 {
        let small = rng.gen_range(0..units.len() - 1);
        (small, small + 1)
    } else {
        let small = rng.gen_range(0..units.len() - 1);
        (small, rng.gen_range(small + 1..units.len()))
    };
    let (small, big) = (&units[small], &units[big]);
    let ratio = big.size / small.size;
    if level >= 4 && rng.gen_bool(0.5) {
        // Upward: the value is a whole number of big units so the answer stays an integer;
        // at most level-2 digits keeps the prompt's value (k·ratio) short.
        let digits = rng.gen_range(1..=level - 2);
        let k = exact_digits(rng, digits);
        let value = k * ratio;
        (
            format!("{value} {} in {}?", small.name, big.name),
            k.to_string(),
        )
    } else {
        let digits = rng.gen_range(1..=level + 1);
        let value = exact_digits(rng, digits);
        (
            format!("{value} {} in {}?", big.name, small.name),
            (value * ratio).to_string(),
        )
    }
}

fn find_unit(name: &str) -> Option<(usize, &'static Unit)> {
    DIMENSIONS
        .iter()
        .enumerate()
        .find_map(|(dimension, units)| {
            units
                .iter()
                .find(|unit| unit.name == name)
                .map(|unit| (dimension, unit))
        })
}

pub(super) fn solve_convert(prompt: &str) -> Option<String> {
    let (from, to) = prompt.strip_suffix('?')?.split_once(" in ")?;
    let (value, from) = from.split_once(' ')?;
    let value = parse_unsigned(value)?;
    let (from_dimension, from) = find_unit(from)?;
    let (to_dimension, to) = find_unit(to)?;
    if from_dimension != to_dimension {
        return None;
    }
    let smallest_units = value.checked_mul(from.size)?;
    if smallest_units % to.size != 0 {
        return None;
    }
    Some((smallest_units / to.size).to_string())
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn exact_digits_has_that_many_digits() {
        let mut rng = StdRng::seed_from_u64(1);
        for digits in 1..=6 {
            for _ in 0..200 {
                let n = exact_digits(&mut rng, digits);
                assert_eq!(n.to_string().len(), digits as usize, "{n}");
            }
        }
    }

    #[test]
    fn one_digit_changes() {
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..500 {
            let n = exact_digits(&mut rng, 4);
            let m = change_one_digit(&mut rng, n, 4);
            let (ns, ms) = (n.to_string(), m.to_string());
            assert_eq!(ms.len(), 4, "{n} -> {m}");
            let differing = ns.bytes().zip(ms.bytes()).filter(|(x, y)| x != y).count();
            assert_eq!(differing, 1, "{n} -> {m}");
        }
    }

    #[test]
    fn parsers_reject_signs_spaces_and_overflow() {
        assert_eq!(parse_unsigned("+3"), None);
        assert_eq!(parse_unsigned(" 3"), None);
        assert_eq!(parse_unsigned(""), None);
        assert_eq!(parse_unsigned("1234567890123456789"), None);
        assert_eq!(
            solve_add("999999999999999999+999999999999999999="),
            Some("1999999999999999998".into())
        );
        assert_eq!(solve_mul("999999999999999999*999999999999999999="), None);
        assert_eq!(solve_successor("next 12"), None);
    }

    #[test]
    fn every_unit_pair_converts_both_ways() {
        // 1 day = 24 h = 1440 min = 86400 s; 1 km = 1000 m = 100000 cm = 1000000 mm.
        assert_eq!(solve_convert("1 day in s?").as_deref(), Some("86400"));
        assert_eq!(solve_convert("86400 s in day?").as_deref(), Some("1"));
        assert_eq!(solve_convert("1 km in cm?").as_deref(), Some("100000"));
        assert_eq!(solve_convert("2 kg in mg?").as_deref(), Some("2000000"));
        assert_eq!(
            solve_convert("90 min in h?"),
            None,
            "1.5 h is not an integer"
        );
        assert_eq!(solve_convert("3 m in m?").as_deref(), Some("3"));
    }
}
