//! Datasets: user JSONL files, or built-in domains sampled into the same shape.
//!
//! A JSONL dataset has one JSON object per line:
//!
//! ```text
//! {"prompt": "What is 6 times 7?", "answer": "42", "domain": "times"}
//! ```
//!
//! `prompt` and `answer` are required (`answer` may also be a JSON number); `domain` is
//! optional and defaults to the file stem; other fields are ignored. Blank lines are skipped.
//! Prompts and answers must not contain a newline, the answer terminator of the training text
//! ([`super::Item::text`]). Each reference answer must be acceptable to the dataset's
//! verifier (a number for `numeric`, one of the options for `choice`).

use std::fmt;
use std::path::Path;

use serde_json::Value;

use super::{sample, Difficulty, Domain, Item, Split, TaskError, Verifier};
use std::io::{BufRead, BufReader, Read};

/// The longest line of a JSONL dataset bitsvf reads (1 MiB).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The largest JSONL dataset bitsvf reads (256 MiB).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// A named list of items checked by one verifier.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Dataset {
    /// The file stem for a JSONL file, the domain name for a built-in domain.
    pub name: String,
    /// How answers to these items are checked.
    pub verifier: Verifier,
    /// The items, in file (or draw) order.
    pub items: Vec<Item>,
}

/// What is wrong with one line of a JSONL dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineProblem {
    /// The line is not valid JSON; carries the parser's message.
    BadJson(String),
    /// The line is valid JSON but not an object.
    NotAnObject,
    /// A required field is absent.
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    WrongType {
        /// The field at fault.
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
    },
    /// A field is empty or only whitespace.
    EmptyField(&'static str),
    /// A field contains a newline, which would end the answer early in training text.
    Newline(&'static str),
    /// The verifier is numeric but the answer is not a number.
    AnswerNotNumeric {
        /// The answer as written.
        answer: String,
    },
    /// The verifier is a choice but the answer is none of its options.
    AnswerNotAChoice {
        /// The answer as written.
        answer: String,
        /// The valid options, comma-separated.
        options: String,
    },
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineProblem::BadJson(message) => write!(f, "bad JSON: {message}"),
            LineProblem::NotAnObject => write!(
                f,
                r#"expected a JSON object like {{"prompt": "...", "answer": "..."}}"#
            ),
            LineProblem::MissingField(field) => write!(f, "missing field `{field}`"),
            LineProblem::WrongType { field, expected } => {
                write!(f, "field `{field}` must be {expected}")
            }
            LineProblem::EmptyField(field) => write!(f, "field `{field}` is empty"),
            LineProblem::Newline(field) => write!(
                f,
                "field `{field}` contains a newline, which is the answer terminator"
            ),
            LineProblem::AnswerNotNumeric { answer } => write!(
                f,
                "answer `{answer}` is not a number, but the verifier is numeric"
            ),
            LineProblem::AnswerNotAChoice { answer, options } => {
                write!(f, "answer `{answer}` is not one of the choices {options}")
            }
        }
    }
}

impl Dataset {
    /// Reads a JSONL file (format in the module docs); the dataset is named after the file
    /// stem, which is also the default domain of its items. The file is streamed with a limit
    /// per line ([`MAX_LINE_BYTES`]) and per file ([`MAX_FILE_BYTES`]), so a huge or endless
    /// input (`/dev/zero`) is refused after reading at most the limit.
    pub fn load_jsonl(path: &Path, verifier: Verifier) -> Result<Dataset, TaskError> {
        let io = |source| TaskError::Io {
            path: path.to_path_buf(),
            source,
        };
        let too_large = |line, limit| TaskError::TooLarge {
            path: path.to_path_buf(),
            line,
            limit,
        };
        let mut reader = BufReader::new(std::fs::File::open(path).map_err(io)?);
        let (mut text, mut line) = (String::new(), Vec::new());
        for number in 1.. {
            line.clear();
            let read = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(io)?;
            if read == 0 {
                break;
            }
            if line.len() > MAX_LINE_BYTES {
                return Err(too_large(Some(number), MAX_LINE_BYTES as u64));
            }
            if (text.len() + line.len()) as u64 > MAX_FILE_BYTES {
                return Err(too_large(None, MAX_FILE_BYTES));
            }
            let s = std::str::from_utf8(&line).map_err(|_| TaskError::NotUtf8 {
                path: path.to_path_buf(),
                line: number,
            })?;
            text.push_str(s);
        }
        Dataset::from_jsonl_str(&text, path, verifier)
    }

    /// Parses JSONL `text` as if read from `path` (used for the name, the default domain and
    /// error messages).
    pub fn from_jsonl_str(
        text: &str,
        path: &Path,
        verifier: Verifier,
    ) -> Result<Dataset, TaskError> {
        verifier.validate()?;
        let name = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Editors on Windows may start UTF-8 files with a byte-order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut items = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let item =
                parse_line(line, &name, &verifier).map_err(|problem| TaskError::BadLine {
                    path: path.to_path_buf(),
                    line: index + 1,
                    problem,
                })?;
            items.push(item);
        }
        if items.is_empty() {
            return Err(TaskError::EmptyDataset {
                path: path.to_path_buf(),
            });
        }
        Ok(Dataset {
            name,
            verifier,
            items,
        })
    }

    /// `n` items of a built-in domain from one split (see [`sample`]), with the domain's
    /// verifier, so generated and user data flow through the same code.
    pub fn generated(
        domain: Domain,
        split: Split,
        n: usize,
        seed: u64,
        difficulty: Difficulty,
    ) -> Result<Dataset, TaskError> {
        Ok(Dataset {
            name: domain.name().to_string(),
            verifier: domain.verifier(),
            items: sample(domain, split, n, seed, difficulty)?,
        })
    }

    /// The items whose (domain, prompt) hash into `split` ([`Split::of`]), in dataset order.
    pub fn split(&self, split: Split) -> Vec<&Item> {
        self.items
            .iter()
            .filter(|item| Split::of(&item.domain, &item.prompt) == split)
            .collect()
    }

    /// Whether `candidate` answers `item` by this dataset's verifier.
    pub fn verify(&self, item: &Item, candidate: &str) -> bool {
        self.verifier.verify(&item.answer, candidate)
    }
}

/// One non-blank line into an item.
fn parse_line(line: &str, default_domain: &str, verifier: &Verifier) -> Result<Item, LineProblem> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| LineProblem::BadJson(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(LineProblem::NotAnObject);
    };
    let text_field = |field: &'static str, value: &Value| -> Result<String, LineProblem> {
        let text = match value {
            Value::String(text) => text.clone(),
            // Numeric answers are often written as JSON numbers.
            Value::Number(number) if field == "answer" => number.to_string(),
            _ => {
                return Err(LineProblem::WrongType {
                    field,
                    expected: if field == "answer" {
                        "a string or a number"
                    } else {
                        "a string"
                    },
                })
            }
        };
        if text.trim().is_empty() {
            return Err(LineProblem::EmptyField(field));
        }
        if text.contains(['\n', '\r']) {
            return Err(LineProblem::Newline(field));
        }
        Ok(text)
    };
    let required = |field: &'static str| -> Result<String, LineProblem> {
        let value = object.get(field).ok_or(LineProblem::MissingField(field))?;
        text_field(field, value)
    };
    let prompt = required("prompt")?;
    let answer = required("answer")?;
    let domain = match object.get("domain") {
        None | Some(Value::Null) => default_domain.to_string(),
        Some(value) => text_field("domain", value)?,
    };
    verifier.check_reference(&answer)?;
    Ok(Item {
        prompt,
        answer,
        domain,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn load(text: &str, verifier: Verifier) -> Result<Dataset, TaskError> {
        Dataset::from_jsonl_str(text, Path::new("data/arith.jsonl"), verifier)
    }

    /// The 1-based line and the problem of a `BadLine` error.
    fn bad_line(result: Result<Dataset, TaskError>) -> (usize, LineProblem) {
        match result {
            Err(TaskError::BadLine {
                path,
                line,
                problem,
            }) => {
                assert_eq!(path, PathBuf::from("data/arith.jsonl"));
                (line, problem)
            }
            other => panic!("expected a BadLine error, got {other:?}"),
        }
    }

    #[test]
    fn reads_items_skipping_blank_lines() {
        let text =
            "\u{feff}\n{\"prompt\": \"6*7=\", \"answer\": \"42\", \"domain\": \"mul\"}\n   \n\
                    {\"prompt\": \"1+1=\", \"answer\": 2, \"id\": 9}\r\n";
        let data = load(text, Verifier::Numeric { tolerance: 0.0 }).unwrap();
        assert_eq!(data.name, "arith");
        assert_eq!(
            data.items,
            vec![
                Item {
                    prompt: "6*7=".into(),
                    answer: "42".into(),
                    domain: "mul".into()
                },
                Item {
                    prompt: "1+1=".into(),
                    answer: "2".into(),
                    domain: "arith".into()
                },
            ]
        );
        assert!(data.verify(&data.items[0], "042"));
        assert!(!data.verify(&data.items[0], "43"));
    }

    #[test]
    fn errors_carry_the_line_number_and_problem() {
        let good = r#"{"prompt": "a", "answer": "1"}"#;
        let exact = || Verifier::Exact;
        let cases: Vec<(String, Verifier, usize, LineProblem)> = vec![
            (
                format!("{good}\n{{\"prompt\": \"b\"\n"),
                exact(),
                2,
                LineProblem::BadJson(String::new()),
            ),
            (
                format!("{good}\n\n[1, 2]"),
                exact(),
                3,
                LineProblem::NotAnObject,
            ),
            (
                format!("{good}\n{{\"answer\": \"1\"}}"),
                exact(),
                2,
                LineProblem::MissingField("prompt"),
            ),
            (
                format!("{{\"prompt\": \"x\"}}\n{good}"),
                exact(),
                1,
                LineProblem::MissingField("answer"),
            ),
            (
                format!("{good}\n{{\"prompt\": \"  \", \"answer\": \"1\"}}"),
                exact(),
                2,
                LineProblem::EmptyField("prompt"),
            ),
            (
                format!("{good}\n{{\"prompt\": 5, \"answer\": \"1\"}}"),
                exact(),
                2,
                LineProblem::WrongType {
                    field: "prompt",
                    expected: "a string",
                },
            ),
            (
                format!("{good}\n{good}\n{{\"prompt\": \"a\\nb\", \"answer\": \"1\"}}"),
                exact(),
                3,
                LineProblem::Newline("prompt"),
            ),
            (
                format!("{good}\n{{\"prompt\": \"a\", \"answer\": \"1\", \"domain\": 3}}"),
                exact(),
                2,
                LineProblem::WrongType {
                    field: "domain",
                    expected: "a string",
                },
            ),
            (
                format!("{good}\n{{\"prompt\": \"q\", \"answer\": \"seven\"}}"),
                Verifier::Numeric { tolerance: 0.0 },
                2,
                LineProblem::AnswerNotNumeric {
                    answer: "seven".into(),
                },
            ),
            (
                r#"{"prompt": "q", "answer": "E"}"#.to_string(),
                Verifier::Choice(vec!["A".into(), "B".into()]),
                1,
                LineProblem::AnswerNotAChoice {
                    answer: "E".into(),
                    options: "A,B".into(),
                },
            ),
        ];
        for (text, verifier, line, problem) in cases {
            let (got_line, got_problem) = bad_line(load(&text, verifier));
            assert_eq!(got_line, line, "{text}");
            match (&got_problem, &problem) {
                // The parser's message is serde_json's; only its kind matters here.
                (LineProblem::BadJson(_), LineProblem::BadJson(_)) => {}
                _ => assert_eq!(got_problem, problem, "{text}"),
            }
        }
    }

    #[test]
    fn error_message_names_file_line_and_field() {
        let err = load(
            "{\"prompt\": \"a\", \"answer\": \"1\"}\n{\"answer\": \"1\"}",
            Verifier::Exact,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "data/arith.jsonl:2: missing field `prompt`"
        );
    }

    #[test]
    fn empty_files_and_bad_verifiers_are_errors() {
        assert!(matches!(
            load("\n  \n", Verifier::Exact),
            Err(TaskError::EmptyDataset { .. })
        ));
        assert!(matches!(
            load(
                "{\"prompt\": \"a\", \"answer\": \"1\"}",
                Verifier::Numeric { tolerance: -1.0 }
            ),
            Err(TaskError::BadVerifier { .. })
        ));
    }

    #[test]
    fn loads_from_disk_and_reports_missing_files() {
        let dir = std::env::temp_dir().join(format!("bitsvf-tasks-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("quiz.jsonl");
        std::fs::write(&path, "{\"prompt\": \"2+2=\", \"answer\": \"4\"}\n").unwrap();
        let data = Dataset::load_jsonl(&path, Verifier::Exact).unwrap();
        assert_eq!(data.name, "quiz");
        assert_eq!(data.items[0].domain, "quiz");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = Dataset::load_jsonl(&path, Verifier::Exact).unwrap_err();
        assert!(
            matches!(&err, TaskError::Io { path: p, .. } if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains("quiz.jsonl"), "{err}");
    }

    /// An endless or huge input is refused after at most the limit, naming the file (and the
    /// line); a line that is not UTF-8 is named.
    #[test]
    fn huge_lines_and_files_are_refused() {
        let err = Dataset::load_jsonl(Path::new("/dev/zero"), Verifier::Exact).unwrap_err();
        assert!(
            matches!(err, TaskError::TooLarge { line: Some(1), .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/dev/zero:1"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, b"{\"prompt\": \"a\", \"answer\": \"b\"}\n\xff\xfe\n").unwrap();
        let err = Dataset::load_jsonl(&path, Verifier::Exact).unwrap_err();
        assert!(err.to_string().contains("bad.jsonl:2: not UTF-8"), "{err}");
    }

    #[test]
    fn user_splits_partition_the_items() {
        let text: String = (0..500)
            .map(|i| format!("{{\"prompt\": \"q{i}?\", \"answer\": \"{i}\"}}\n"))
            .collect();
        let data = load(&text, Verifier::Numeric { tolerance: 0.0 }).unwrap();
        let sizes: Vec<usize> = Split::ALL.iter().map(|&s| data.split(s).len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 500);
        assert!(
            sizes[0] > 350 && sizes[1] > 20 && sizes[2] > 20,
            "{sizes:?}"
        );
        for item in data.split(Split::Test) {
            assert_eq!(Split::of("arith", &item.prompt), Split::Test);
        }
    }

    #[test]
    fn generated_datasets_use_the_domain_verifier() {
        let data =
            Dataset::generated(Domain::Brackets, Split::Train, 10, 0, Difficulty::MAX).unwrap();
        assert_eq!(data.name, "brackets");
        assert_eq!(data.verifier, Domain::Brackets.verifier());
        assert_eq!(data.split(Split::Train).len(), 10);
        assert!(data.verify(&data.items[0], &data.items[0].answer.to_uppercase()));
    }
}
