//! Search terms: the checked form the super peers evaluate (on records and on peers' profiles), converted from
//! the `SearchTerm`s of a request.

use std::collections::BTreeMap;

use crate::v1::{search_term, SearchTerm};
use crate::validate::{self, InvalidInput};

/// A search condition, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Equals(String),
    Prefix(String),
}

/// One attribute condition of a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub attribute: String,
    pub condition: Condition,
}

impl Term {
    /// Whether `attributes` satisfy this term (a missing attribute never does).
    pub fn matches(&self, attributes: &BTreeMap<String, String>) -> bool {
        match (attributes.get(&self.attribute), &self.condition) {
            (Some(value), Condition::Equals(wanted)) => value == wanted,
            (Some(value), Condition::Prefix(prefix)) => value.starts_with(prefix.as_str()),
            (None, _) => false,
        }
    }
}

/// Checks and converts the terms of a search request: 1 to [`validate::MAX_SEARCH_TERMS`] of them, each on a
/// valid attribute name with a valid value and a condition.
pub fn terms(terms: &[SearchTerm]) -> Result<Vec<Term>, InvalidInput> {
    if terms.is_empty() {
        return Err(InvalidInput::NoTerms);
    }
    if terms.len() > validate::MAX_SEARCH_TERMS {
        return Err(InvalidInput::TooManyTerms {
            count: terms.len(),
            max: validate::MAX_SEARCH_TERMS,
        });
    }
    terms
        .iter()
        .map(|term| {
            validate::attribute_name(&term.attribute)?;
            let condition = match &term.condition {
                Some(search_term::Condition::Equals(value)) => {
                    validate::attribute_value(&validate::SizeLimits::CEILING, value)?;
                    Condition::Equals(value.clone())
                }
                Some(search_term::Condition::Prefix(prefix)) => {
                    validate::attribute_value(&validate::SizeLimits::CEILING, prefix)?;
                    Condition::Prefix(prefix.clone())
                }
                None => {
                    return Err(InvalidInput::NoCondition {
                        attribute: term.attribute.clone(),
                    })
                }
            };
            Ok(Term {
                attribute: term.attribute.clone(),
                condition,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn equals(attribute: &str, value: &str) -> SearchTerm {
        SearchTerm {
            attribute: attribute.into(),
            condition: Some(search_term::Condition::Equals(value.into())),
        }
    }

    #[test]
    fn terms_are_checked_and_matched() {
        let checked = terms(&[equals("city", "oslo")]).unwrap();
        let attributes = BTreeMap::from([("city".to_string(), "oslo".to_string())]);
        assert!(checked[0].matches(&attributes));
        assert!(!checked[0].matches(&BTreeMap::new()));
        assert_eq!(terms(&[]), Err(InvalidInput::NoTerms));
        assert!(matches!(
            terms(&vec![equals("a", "b"); validate::MAX_SEARCH_TERMS + 1]),
            Err(InvalidInput::TooManyTerms { .. })
        ));
        let no_condition = SearchTerm {
            attribute: "city".into(),
            condition: None,
        };
        assert!(matches!(
            terms(&[no_condition]),
            Err(InvalidInput::NoCondition { .. })
        ));
        assert!(terms(&[equals("Bad Name", "x")]).is_err());
    }
}
