//! One table per fieldless enum of settings — (variant, name, help) — gives its `ALL`, its
//! `name()`, `FromStr` (errors list the names) and clap's `ValueEnum`, so no enum is declared
//! twice for the command line and no name list is written by hand.

/// `impl` of `ALL`, `name()`, [`std::str::FromStr`] and `clap::ValueEnum` for `$ty` from
/// its table; `$what` names the setting in errors (`parameterization \`x\`: expected …`).
/// An empty help adds none.
#[macro_export]
#[doc(hidden)]
macro_rules! value_names {
    ($ty:ident, $what:literal, [$(($variant:ident, $name:literal, $help:literal)),+ $(,)?]) => {
        impl $ty {
            /// Every value, in the order reports list them.
            pub const ALL: [$ty; [$($name),+].len()] = [$($ty::$variant),+];

            /// The name used on the command line, in reports and in files.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::Error;
            fn from_str(s: &str) -> $crate::Result<Self> {
                Self::ALL.into_iter().find(|v| v.name() == s).ok_or_else(|| {
                    $crate::Error::Input(format!(
                        "{} `{s}`: expected {}",
                        $what,
                        $crate::names::one_of(&[$($name),+])
                    ))
                })
            }
        }

        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &Self::ALL
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                let help = match self {
                    $($ty::$variant => $help),+
                };
                let value = clap::builder::PossibleValue::new(self.name());
                Some(if help.is_empty() { value } else { value.help(help) })
            }
        }
    };
}

/// `a, b or c`.
pub fn one_of(names: &[&str]) -> String {
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.to_string(),
        None => String::new(),
    }
}
