//! The `program` domain: straight-line programs such as `a=3;b=a+2;b?` → `5`.
//!
//! Grammar of a prompt (no spaces):
//!
//! ```text
//! prompt     := statement (';' statement)* ';' variable '?'
//! statement  := variable '=' expression
//! expression := term (('+' | '-') term)*
//! term       := atom ('*' atom)*
//! atom       := number | variable        variable := 'a'..='z'
//! ```
//!
//! The generator writes only `N`, `x+N`, `x-N`, `x+y`, `x-y` and `x*N`; the solver reads the
//! whole grammar with the usual precedence so hand-written prompts work too.

use rand::Rng;

/// Variable names, in the order fresh variables are introduced. Four keeps the longest
/// program (6 statements) within 40 characters while forcing re-assignment at level 5.
const NAMES: [char; 4] = ['a', 'b', 'c', 'd'];

pub(super) fn generate<R: Rng + ?Sized>(rng: &mut R, level: u32) -> (String, String) {
    let statements = level as usize + 1;
    let max_variables = statements.min(NAMES.len());
    // values[i] is the current value of NAMES[i]; variables are introduced in name order.
    // Two-digit starting values give level 1 about 1800 distinct programs instead of 180.
    let first = rng.gen_range(0..=99i64);
    let mut values = vec![first];
    let mut text = format!("{}={first};", NAMES[0]);
    let mut last = 0;
    for _ in 1..statements {
        let reassign = values.len() == max_variables || (level >= 3 && rng.gen_bool(1.0 / 3.0));
        let target = if reassign {
            rng.gen_range(0..values.len())
        } else {
            values.len()
        };
        let x = rng.gen_range(0..values.len());
        let forms = match level {
            1 => 2,
            2 | 3 => 4,
            _ => 5,
        };
        let (expression, value) = match rng.gen_range(0..forms) {
            0 => {
                let n = rng.gen_range(1..=9);
                (format!("{}+{n}", NAMES[x]), values[x] + n)
            }
            2 => {
                let y = rng.gen_range(0..values.len());
                (format!("{}+{}", NAMES[x], NAMES[y]), values[x] + values[y])
            }
            // `x-x` is always 0 and would flood the answers with zeros, so `x-y` needs a
            // second variable; without one it falls back to `x-N` below.
            3 if values.len() >= 2 => {
                let y = (x + rng.gen_range(1..values.len())) % values.len();
                (format!("{}-{}", NAMES[x], NAMES[y]), values[x] - values[y])
            }
            1 | 3 => {
                let n = rng.gen_range(1..=9);
                (format!("{}-{n}", NAMES[x]), values[x] - n)
            }
            _ => {
                let n = rng.gen_range(2..=3);
                (format!("{}*{n}", NAMES[x]), values[x] * n)
            }
        };
        if target == values.len() {
            values.push(value);
        } else {
            values[target] = value;
        }
        text.push(NAMES[target]);
        text.push('=');
        text.push_str(&expression);
        text.push(';');
        last = target;
    }
    // Asking for an earlier variable forces the model to track every assignment, not just
    // the last line.
    let query = if level >= 3 {
        rng.gen_range(0..values.len())
    } else {
        last
    };
    text.push(NAMES[query]);
    text.push('?');
    (text, values[query].to_string())
}

/// Index of a variable name `a`..=`z`.
fn variable(byte: u8) -> Option<usize> {
    byte.is_ascii_lowercase().then(|| usize::from(byte - b'a'))
}

pub(super) fn solve(prompt: &str) -> Option<String> {
    let (body, query) = prompt.strip_suffix('?')?.rsplit_once(';')?;
    let mut env: [Option<i64>; 26] = [None; 26];
    for statement in body.split(';') {
        let (name, expression) = statement.split_once('=')?;
        let [name] = name.as_bytes() else {
            return None;
        };
        let target = variable(*name)?;
        env[target] = Some(evaluate(expression.as_bytes(), &env)?);
    }
    let [query] = query.as_bytes() else {
        return None;
    };
    Some(env[variable(*query)?]?.to_string())
}

/// Evaluates `expression` over `env`: sums of products of numbers and assigned variables.
fn evaluate(expression: &[u8], env: &[Option<i64>; 26]) -> Option<i64> {
    let mut rest = expression;
    let mut sum = term(&mut rest, env)?;
    while let Some((&operator, after)) = rest.split_first() {
        rest = after;
        let value = term(&mut rest, env)?;
        sum = match operator {
            b'+' => sum.checked_add(value)?,
            b'-' => sum.checked_sub(value)?,
            _ => return None,
        };
    }
    Some(sum)
}

/// Reads `atom ('*' atom)*` from the front of `rest`.
fn term(rest: &mut &[u8], env: &[Option<i64>; 26]) -> Option<i64> {
    let mut product = atom(rest, env)?;
    while let Some((b'*', after)) = rest.split_first() {
        *rest = after;
        product = product.checked_mul(atom(rest, env)?)?;
    }
    Some(product)
}

/// Reads a number or an assigned variable from the front of `rest`.
fn atom(rest: &mut &[u8], env: &[Option<i64>; 26]) -> Option<i64> {
    let (&first, after) = rest.split_first()?;
    if let Some(index) = variable(first) {
        *rest = after;
        return env[index];
    }
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 18 {
        return None;
    }
    let number = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    *rest = &rest[digits..];
    Some(number)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn hand_evaluated_programs() {
        let cases: &[(&str, Option<&str>)] = &[
            ("a=3;b=a+2;b?", Some("5")),
            ("a=3;b=a+2;a?", Some("3")),
            ("a=5;b=a-9;b?", Some("-4")),
            // a=2, b=6, a=2+6=8
            ("a=2;b=a*3;a=a+b;a?", Some("8")),
            // Precedence: 1 + 2*3 = 7, not 9.
            ("a=1;b=2;c=a+b*3;c?", Some("7")),
            // Left to right: 10 - 3 - 2 = 5, not 9.
            ("a=10;b=a-3-2;b?", Some("5")),
            // a=4, b=4-4=0, c=0-4=-4, d=-4*3=-12
            ("a=4;b=a-a;c=b-a;d=c*3;d?", Some("-12")),
            ("a=1;x?", None),
            ("a=b+1;a?", None),
            ("a=1;b=a+;b?", None),
            ("a=1;b=-a;b?", None),
            ("a=1;ab=2;a?", None),
            ("a=1?", None),
            ("a=3;b=a+2;b", None),
            ("a=999999999999999999;b=a*a;b?", None),
        ];
        for (prompt, answer) in cases {
            assert_eq!(solve(prompt).as_deref(), *answer, "{prompt}");
        }
    }

    #[test]
    fn level_one_programs_have_the_documented_shape() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..100 {
            let (prompt, _) = generate(&mut rng, 1);
            let statements: Vec<&str> = prompt.split(';').collect();
            assert_eq!(statements.len(), 3, "{prompt}");
            assert!(statements[1].starts_with("b=a"), "{prompt}");
            assert_eq!(statements[2], "b?", "{prompt}");
        }
    }

    #[test]
    fn harder_levels_use_every_form() {
        let mut rng = StdRng::seed_from_u64(12);
        let text: String = (0..300).map(|_| generate(&mut rng, 5).0).collect();
        for form in ["*2", "*3", "+a", "-b", "a=a", "d="] {
            assert!(text.contains(form), "{form}");
        }
    }
}
