//! Label selectors, validated once and then matched many times.

use std::collections::BTreeSet;
use std::fmt;

use crate::model::{LabelSelector, Labels};

/// A validated selector: the AND of its requirements. Empty selects everything.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Requirement {
    key: String,
    op: Operator,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Operator {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// Why a selector cannot be used, with the field inside the selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError {
    pub field: String,
    pub reason: String,
}

impl Selector {
    pub fn everything() -> Self {
        Self {
            requirements: Vec::new(),
        }
    }

    /// Validates a selector as the API server would. On error, the selector that treats each
    /// broken requirement as satisfied is returned too: it selects a superset of anything the
    /// author could have meant, which is what isolation must cover to fail closed.
    pub fn parse(selector: &LabelSelector) -> Result<Self, (SelectorError, Self)> {
        let mut requirements: Vec<Requirement> = selector
            .match_labels
            .iter()
            .map(|(k, v)| Requirement {
                key: k.clone(),
                op: Operator::In(BTreeSet::from([v.clone()])),
            })
            .collect();
        let mut first_error = None;
        for (i, expr) in selector.match_expressions.iter().enumerate() {
            let values: BTreeSet<String> = expr.values.iter().cloned().collect();
            let op = match (expr.operator.as_str(), values.is_empty()) {
                ("In", false) => Ok(Operator::In(values)),
                ("NotIn", false) => Ok(Operator::NotIn(values)),
                ("Exists", true) => Ok(Operator::Exists),
                ("DoesNotExist", true) => Ok(Operator::DoesNotExist),
                ("In" | "NotIn", true) => Err(format!(
                    "operator {} needs at least one value",
                    expr.operator
                )),
                ("Exists" | "DoesNotExist", false) => {
                    Err(format!("operator {} takes no values", expr.operator))
                }
                (other, _) => Err(format!(
                    "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                )),
            };
            match op {
                Ok(op) => requirements.push(Requirement {
                    key: expr.key.clone(),
                    op,
                }),
                Err(reason) => {
                    first_error.get_or_insert(SelectorError {
                        field: format!("matchExpressions[{i}].operator"),
                        reason,
                    });
                }
            }
        }
        requirements.sort();
        requirements.dedup();
        let parsed = Self { requirements };
        match first_error {
            None => Ok(parsed),
            Some(err) => Err((err, parsed)),
        }
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| {
            let value = labels.get(&r.key);
            match &r.op {
                Operator::In(values) => value.is_some_and(|v| values.contains(v)),
                Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
    }
}

/// Canonical text, in `kubectl` selector syntax; `{}` when it selects everything.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let list =
                |values: &BTreeSet<String>| values.iter().cloned().collect::<Vec<_>>().join(",");
            match &r.op {
                Operator::In(values) if values.len() == 1 => {
                    write!(f, "{}={}", r.key, list(values))?
                }
                Operator::In(values) => write!(f, "{} in ({})", r.key, list(values))?,
                Operator::NotIn(values) => write!(f, "{} notin ({})", r.key, list(values))?,
                Operator::Exists => write!(f, "{}", r.key)?,
                Operator::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: vec![SelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
            ..LabelSelector::default()
        }
    }

    #[test]
    fn operators() {
        type Case<'a> = (LabelSelector, &'a [(&'a str, &'a str)], bool);
        let cases: &[Case] = &[
            (LabelSelector::default(), &[], true),
            (expr("app", "In", &["a", "b"]), &[("app", "b")], true),
            (expr("app", "In", &["a", "b"]), &[("app", "c")], false),
            (expr("app", "In", &["a"]), &[], false),
            (expr("app", "NotIn", &["a"]), &[], true),
            (expr("app", "NotIn", &["a"]), &[("app", "a")], false),
            (expr("app", "NotIn", &["a"]), &[("app", "b")], true),
            (expr("app", "Exists", &[]), &[("app", "")], true),
            (expr("app", "Exists", &[]), &[("x", "y")], false),
            (expr("app", "DoesNotExist", &[]), &[("x", "y")], true),
            (expr("app", "DoesNotExist", &[]), &[("app", "y")], false),
        ];
        for (selector, l, want) in cases {
            let s = Selector::parse(selector).unwrap();
            assert_eq!(s.matches(&labels(l)), *want, "{s} on {l:?}");
        }
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let mut sel = expr("tier", "In", &["db"]);
        sel.match_labels = labels(&[("app", "pay")]);
        let s = Selector::parse(&sel).unwrap();
        assert!(s.matches(&labels(&[("app", "pay"), ("tier", "db")])));
        assert!(!s.matches(&labels(&[("app", "pay")])));
        assert!(!s.matches(&labels(&[("tier", "db")])));
        assert_eq!(s.to_string(), "app=pay,tier=db");
    }

    #[test]
    fn invalid_operators_are_reported_with_a_superset() {
        for (op, values) in [("Equals", vec!["a"]), ("In", vec![]), ("Exists", vec!["a"])] {
            let mut sel = expr("app", op, &values);
            sel.match_labels = labels(&[("team", "x")]);
            let (err, superset) = Selector::parse(&sel).unwrap_err();
            assert_eq!(err.field, "matchExpressions[0].operator");
            assert!(superset.matches(&labels(&[("team", "x")])));
            assert!(!superset.matches(&labels(&[("team", "y")])));
        }
    }
}
