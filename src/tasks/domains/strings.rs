//! String domains: reverse, copy, sort, count, brackets, parity.
//!
//! Generators return `(prompt, answer)`; solvers parse a prompt and return its answer.

use rand::Rng;

/// `len` characters drawn uniformly from `alphabet`.
fn random_string<R: Rng + ?Sized>(rng: &mut R, alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| char::from(alphabet[rng.gen_range(0..alphabet.len())]))
        .collect()
}

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const DIGITS: &[u8] = b"0123456789";

/// Length for reverse, copy and sort: level+1 to 2·level+2 (at most 12 at level 5).
fn string_length<R: Rng + ?Sized>(rng: &mut R, level: u32) -> usize {
    rng.gen_range(level as usize + 1..=2 * level as usize + 2)
}

/// The text between `prefix` and `end`, if the prompt has that shape.
fn between<'a>(prompt: &'a str, prefix: &str, end: char) -> Option<&'a str> {
    prompt.strip_prefix(prefix)?.strip_suffix(end)
}

pub(super) fn generate_reverse<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let len = string_length(rng, level);
    let text = random_string(rng, LETTERS, len);
    let reversed = text.chars().rev().collect();
    (format!("rev {text}="), reversed)
}

pub(super) fn solve_reverse(prompt: &str) -> Option<String> {
    let text = between(prompt, "rev ", '=')?;
    (!text.is_empty()).then(|| text.chars().rev().collect())
}

pub(super) fn generate_copy<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let len = string_length(rng, level);
    let text = random_string(rng, LETTERS, len);
    (format!("copy {text}="), text)
}

pub(super) fn solve_copy(prompt: &str) -> Option<String> {
    let text = between(prompt, "copy ", '=')?;
    (!text.is_empty()).then(|| text.to_string())
}

pub(super) fn generate_sort<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let len = string_length(rng, level);
    let text = random_string(rng, DIGITS, len);
    let mut sorted: Vec<char> = text.chars().collect();
    sorted.sort_unstable();
    (format!("sort {text}="), sorted.into_iter().collect())
}

pub(super) fn solve_sort(prompt: &str) -> Option<String> {
    let text = between(prompt, "sort ", '=')?;
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort_unstable();
    (!chars.is_empty()).then(|| chars.into_iter().collect())
}

pub(super) fn generate_count<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    // A small alphabet keeps counts well above zero; it grows with the level to add
    // distractors.
    let alphabet = &LETTERS[..level as usize + 2];
    let len = rng.gen_range(level as usize + 3..=2 * level as usize + 3);
    let text = random_string(rng, alphabet, len);
    let target = char::from(alphabet[rng.gen_range(0..alphabet.len())]);
    let count = text.chars().filter(|&c| c == target).count();
    (format!("count {target} in {text}?"), count.to_string())
}

pub(super) fn solve_count(prompt: &str) -> Option<String> {
    let (target, text) = between(prompt, "count ", '?')?.split_once(" in ")?;
    let mut target_chars = target.chars();
    let (Some(target), None) = (target_chars.next(), target_chars.next()) else {
        return None;
    };
    Some(text.chars().filter(|&c| c == target).count().to_string())
}

/// Whether `text` (only `()[]`) is balanced; `None` if it holds any other character.
fn balanced(text: &str) -> Option<bool> {
    let mut open = Vec::new();
    for c in text.chars() {
        match c {
            '(' | '[' => open.push(c),
            ')' | ']' => {
                let expected = if c == ')' { '(' } else { '[' };
                if open.pop() != Some(expected) {
                    // Keep scanning so that a stray character still makes the prompt invalid.
                    return text.chars().all(|c| "()[]".contains(c)).then_some(false);
                }
            }
            _ => return None,
        }
    }
    Some(open.is_empty())
}

pub(super) fn generate_brackets<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    // Two kinds at every level: with `()` alone, level 1 would have about 20 distinct prompts,
    // too few to fill a test split.
    let kinds: &[(u8, u8)] = &[(b'(', b')'), (b'[', b']')];
    // A random balanced string: open while pairs remain (coin flip unless forced), else close.
    let pairs = rng.gen_range(1..=level as usize + 2);
    let mut text = Vec::with_capacity(2 * pairs);
    let mut closers = Vec::with_capacity(pairs);
    let mut opens_left = pairs;
    while text.len() < 2 * pairs {
        let must_open = closers.is_empty();
        if opens_left > 0 && (must_open || rng.gen_bool(0.5)) {
            let (open, close) = kinds[rng.gen_range(0..kinds.len())];
            text.push(open);
            closers.push(close);
            opens_left -= 1;
        } else if let Some(close) = closers.pop() {
            text.push(close);
        }
    }
    // Half the strings get one corruption; same length, so counting brackets is not enough.
    if rng.gen_bool(0.5) {
        let i = rng.gen_range(0..text.len());
        match rng.gen_range(0..3) {
            0 => {
                text[i] = match text[i] {
                    b'(' => b')',
                    b')' => b'(',
                    b'[' => b']',
                    _ => b'[',
                }
            }
            1 => {
                let j = rng.gen_range(0..text.len());
                text.swap(i, j);
            }
            _ => {
                text[i] = match text[i] {
                    b'(' => b'[',
                    b'[' => b'(',
                    b')' => b']',
                    _ => b')',
                }
            }
        }
    }
    let text: String = text.into_iter().map(char::from).collect();
    let answer = if balanced(&text) == Some(true) {
        "yes"
    } else {
        "no"
    };
    (format!("bal {text}?"), answer.to_string())
}

pub(super) fn solve_brackets(prompt: &str) -> Option<String> {
    let text = between(prompt, "bal ", '?')?;
    let answer = if balanced(text)? { "yes" } else { "no" };
    Some(answer.to_string())
}

pub(super) fn generate_parity<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let len = rng.gen_range(level as usize + 5..=2 * level as usize + 6);
    let bits = random_string(rng, b"01", len);
    let ones = bits.bytes().filter(|&b| b == b'1').count();
    let answer = if ones % 2 == 0 { "even" } else { "odd" };
    (format!("par {bits}?"), answer.to_string())
}

pub(super) fn solve_parity(prompt: &str) -> Option<String> {
    let bits = between(prompt, "par ", '?')?;
    if bits.is_empty() || !bits.bytes().all(|b| b == b'0' || b == b'1') {
        return None;
    }
    let ones = bits.bytes().filter(|&b| b == b'1').count();
    Some(if ones % 2 == 0 { "even" } else { "odd" }.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_by_hand() {
        assert_eq!(balanced(""), Some(true));
        assert_eq!(balanced("()"), Some(true));
        assert_eq!(balanced("([])[]"), Some(true));
        assert_eq!(balanced("(]"), Some(false));
        assert_eq!(balanced("(()"), Some(false));
        assert_eq!(balanced("())("), Some(false));
        assert_eq!(balanced("([)]"), Some(false));
        assert_eq!(balanced("(x)"), None);
        assert_eq!(balanced(")x"), None);
    }

    #[test]
    fn string_solvers_by_hand() {
        assert_eq!(solve_reverse("rev hello=").as_deref(), Some("olleh"));
        assert_eq!(solve_reverse("rev ="), None);
        assert_eq!(solve_copy("copy hello=").as_deref(), Some("hello"));
        assert_eq!(solve_sort("sort 90210=").as_deref(), Some("00129"));
        assert_eq!(solve_count("count l in hello?").as_deref(), Some("2"));
        assert_eq!(solve_count("count ll in hello?"), None);
        assert_eq!(solve_parity("par 111?").as_deref(), Some("odd"));
        assert_eq!(solve_parity("par 0?").as_deref(), Some("even"));
    }
}
