//! `google.api.http` path templates: parsed once at start, matched against
//! every request path.
//!
//! The grammar (from `google/api/http.proto`):
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```

use std::fmt;

use percent_encoding::percent_decode_str;

/// One segment of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    Any,
    /// `**`: the rest of the path, zero or more segments (last only).
    Rest,
}

/// A variable: the field it sets and the segments it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Variable {
    field_path: String,
    start: usize,
    end: usize,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path template {template:?}: {reason}")]
pub struct TemplateError {
    template: String,
    reason: &'static str,
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Template {
    /// Parses `source`.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let fail = |reason| TemplateError {
            template: source.to_owned(),
            reason,
        };
        let rest = source.strip_prefix('/').ok_or(fail("must start with /"))?;
        // The verb follows the last segment; a ':' inside braces belongs to
        // no verb, so look only after the last '}'.
        let tail_start = rest.rfind('}').map_or(0, |i| i + 1);
        let (path, verb) = match rest[tail_start..].rfind(':') {
            Some(i) => {
                let at = tail_start + i;
                (&rest[..at], Some(rest[at + 1..].to_owned()))
            }
            None => (rest, None),
        };
        if verb
            .as_deref()
            .is_some_and(|v| v.is_empty() || v.contains('/'))
        {
            return Err(fail("empty or malformed verb"));
        }
        let mut template = Template {
            source: source.to_owned(),
            segments: Vec::new(),
            variables: Vec::new(),
            verb,
        };
        let mut chars = path;
        while !chars.is_empty() {
            if let Some(inner) = chars.strip_prefix('{') {
                let close = inner.find('}').ok_or(fail("unclosed variable"))?;
                let body = &inner[..close];
                let (field_path, pattern) = match body.split_once('=') {
                    Some((field, pattern)) => (field, pattern),
                    None => (body, "*"),
                };
                let valid_ident = |s: &str| {
                    !s.is_empty()
                        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !s.starts_with(|c: char| c.is_ascii_digit())
                };
                if !field_path.split('.').all(valid_ident) {
                    return Err(fail("bad field path in variable"));
                }
                if template
                    .variables
                    .iter()
                    .any(|v| v.field_path == field_path)
                {
                    return Err(fail("variable bound twice"));
                }
                let start = template.segments.len();
                for part in pattern.split('/') {
                    if part.contains(['{', '}']) {
                        return Err(fail("nested variable"));
                    }
                    template
                        .segments
                        .push(segment(part).ok_or(fail("empty segment"))?);
                }
                template.variables.push(Variable {
                    field_path: field_path.to_owned(),
                    start,
                    end: template.segments.len(),
                });
                chars = &inner[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let part = &chars[..end];
                if part.contains(['{', '}']) {
                    return Err(fail("variable must be a whole segment"));
                }
                template
                    .segments
                    .push(segment(part).ok_or(fail("empty segment"))?);
                chars = &chars[end..];
            }
            match chars.strip_prefix('/') {
                Some("") => return Err(fail("trailing /")),
                Some(next) => chars = next,
                None if chars.is_empty() => {}
                None => return Err(fail("variable must be a whole segment")),
            }
        }
        if template.segments.is_empty() {
            return Err(fail("no segments"));
        }
        let last = template.segments.len() - 1;
        if template.segments[..last].contains(&Segment::Rest) {
            return Err(fail("** must be the last segment"));
        }
        Ok(template)
    }

    /// The template as written in the proto.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The field paths of the variables, in order.
    pub fn field_paths(&self) -> impl Iterator<Item = &str> {
        self.variables.iter().map(|v| v.field_path.as_str())
    }

    /// The custom verb (`cancel` in `/v1/orders/{id}:cancel`).
    pub fn verb(&self) -> Option<&str> {
        self.verb.as_deref()
    }

    /// How specific the template is: literals first, then fewer wildcards.
    /// Routes are tried in descending order of this.
    pub fn specificity(&self) -> (bool, usize, usize, bool) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        let has_rest = self.segments.contains(&Segment::Rest);
        (
            self.verb.is_some(),
            literals,
            self.segments.len(),
            !has_rest,
        )
    }

    /// The OpenAPI form of the path: `/v1/orders/{order_id}:cancel`.
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.segments.len() {
            out.push('/');
            if let Some(v) = self.variables.iter().find(|v| v.start == i) {
                out.push('{');
                out.push_str(&v.field_path);
                out.push('}');
                i = v.end.max(i + 1);
                continue;
            }
            match &self.segments[i] {
                Segment::Literal(l) => out.push_str(l),
                Segment::Any => out.push('*'),
                Segment::Rest => out.push_str("**"),
            }
            i += 1;
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }

    /// Matches a request path (without the query); on a match, the bound
    /// variables as (field path, decoded value).
    pub fn matches<'t>(&'t self, path: &str) -> Option<Vec<(&'t str, String)>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let parts: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').collect()
        };
        // Where each template segment starts in `parts`.
        let mut at = Vec::with_capacity(self.segments.len() + 1);
        let mut p = 0;
        for segment in &self.segments {
            at.push(p);
            match segment {
                Segment::Literal(l) => {
                    if parts.get(p) != Some(&l.as_str()) {
                        return None;
                    }
                    p += 1;
                }
                Segment::Any => {
                    if parts.get(p).is_none_or(|s| s.is_empty()) {
                        return None;
                    }
                    p += 1;
                }
                Segment::Rest => p = parts.len(),
            }
        }
        at.push(p);
        if p != parts.len() {
            return None;
        }
        let mut bound = Vec::with_capacity(self.variables.len());
        for v in &self.variables {
            let covered = &parts[at[v.start]..at[v.end]];
            let value = if v.end - v.start == 1 && self.segments[v.start] != Segment::Rest {
                // A single segment: everything is decoded.
                percent_decode_str(covered[0])
                    .decode_utf8()
                    .ok()?
                    .into_owned()
            } else {
                // Several segments: '/' stays, and so does an encoded one.
                covered
                    .iter()
                    .map(|s| {
                        let kept = s.replace("%2F", "%252F").replace("%2f", "%252f");
                        percent_decode_str(&kept)
                            .decode_utf8()
                            .map(|d| d.into_owned())
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .ok()?
                    .join("/")
            };
            bound.push((v.field_path.as_str(), value));
        }
        Some(bound)
    }
}

fn segment(part: &str) -> Option<Segment> {
    match part {
        "" => None,
        "*" => Some(Segment::Any),
        "**" => Some(Segment::Rest),
        literal => Some(Segment::Literal(literal.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn bound(template: &str, path: &str) -> Option<Vec<(String, String)>> {
        let t = Template::parse(template).unwrap();
        t.matches(path).map(|b| {
            b.into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<Vec<_>>()
        })
    }

    fn pairs(p: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            p.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn a_literal_template_matches_only_its_path() {
        assert_eq!(bound("/v1/menu", "/v1/menu"), pairs(&[]));
        assert_eq!(bound("/v1/menu", "/v1/menus"), None);
        assert_eq!(bound("/v1/menu", "/v1/menu/x"), None);
    }

    #[test]
    fn a_variable_binds_one_decoded_segment() {
        assert_eq!(
            bound("/v1/orders/{order_id}", "/v1/orders/a%20b"),
            pairs(&[("order_id", "a b")])
        );
        assert_eq!(bound("/v1/orders/{order_id}", "/v1/orders/a/b"), None);
        assert_eq!(bound("/v1/orders/{order_id}", "/v1/orders/"), None);
    }

    #[test]
    fn a_custom_verb_is_split_off_the_last_segment() {
        let t = "/v1/orders/{order_id}:cancel";
        assert_eq!(
            bound(t, "/v1/orders/o1:cancel"),
            pairs(&[("order_id", "o1")])
        );
        assert_eq!(bound(t, "/v1/orders/o1:watch"), None);
        assert_eq!(bound(t, "/v1/orders/o1"), None);
        assert_eq!(
            bound("/v1/payments:authorize", "/v1/payments:authorize"),
            pairs(&[])
        );
    }

    #[test]
    fn nested_field_paths_and_multi_segment_patterns_bind() {
        assert_eq!(
            bound("/v1/{name=shelves/*/books/*}", "/v1/shelves/s1/books/b%2F2"),
            pairs(&[("name", "shelves/s1/books/b%2F2")])
        );
        assert_eq!(
            bound("/v1/{book.shelf.id}/x", "/v1/7/x"),
            pairs(&[("book.shelf.id", "7")])
        );
        assert_eq!(
            bound("/v1/files/{path=**}", "/v1/files/a/b/c.txt"),
            pairs(&[("path", "a/b/c.txt")])
        );
        assert_eq!(bound("/v1/*/x", "/v1/anything/x"), pairs(&[]));
        assert_eq!(bound("/v1/**", "/v1/a/b"), pairs(&[]));
    }

    #[test]
    fn malformed_templates_are_rejected() {
        for t in [
            "v1/x",
            "/v1/{id",
            "/v1/{a}{b}",
            "/v1/**/x",
            "/v1//x",
            "/v1/x/",
            "/v1/{a}/{a}",
            "/v1/x:",
            "/v1/{1a}",
        ] {
            assert!(Template::parse(t).is_err(), "{t}");
        }
    }

    #[test]
    fn openapi_paths_name_the_variables() {
        let t = Template::parse("/v1/{name=shelves/*}/books/{id}:cancel").unwrap();
        assert_eq!(t.openapi_path(), "/v1/{name}/books/{id}:cancel");
    }
}
