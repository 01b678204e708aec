//! The text before the YAML parser sees it: a size cap, a leading byte-order mark, and a cap
//! on nesting found by a linear pre-scan.
//!
//! The parser's work grows with the square of the nesting depth, so a few hundred kilobytes of
//! `[[[[…` keep it busy far longer than a check or a reload may take, only to be refused. A
//! topology nests about six levels (`regions[0].replicas[0]` in flow style), so neither cap
//! refuses a real one.

/// Largest topology, in bytes. A topology is a few kilobytes; this leaves room for thousands
/// of replicas and their comments.
pub const MAX_CONFIG_BYTES: usize = 4 << 20;

/// Deepest nesting of YAML collections, block and flow together. A topology needs about six.
pub const MAX_NESTING_DEPTH: usize = 64;

/// Why text was refused before parsing.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The 1-based line, when one is to blame.
    pub line: Option<usize>,
    /// What is wrong, for the operator.
    pub message: String,
}

/// The refusal of text longer than [`MAX_CONFIG_BYTES`].
pub(crate) fn too_large() -> Refusal {
    Refusal {
        line: None,
        message: format!(
            "larger than {} MiB, the most a topology may be (one is a few kilobytes): is this \
             the right file?",
            MAX_CONFIG_BYTES >> 20
        ),
    }
}

/// `text` without a leading byte-order mark, once it is within both caps.
pub(crate) fn prepare(text: &str) -> Result<&str, Refusal> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    // Editors on some systems start UTF-8 files with one, and the parser does not skip it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut scan = Scan::default();
    for (i, line) in text.split('\n').enumerate() {
        if scan.line(line.as_bytes()) > MAX_NESTING_DEPTH {
            return Err(Refusal {
                line: Some(i + 1),
                message: format!(
                    "line {}: nested deeper than {MAX_NESTING_DEPTH} levels, the most a topology \
                     may use (one needs about six); refused before parsing, which would take \
                     long at this depth",
                    i + 1
                ),
            });
        }
    }
    Ok(text)
}

/// Where the scan is, outside quotes, on YAML's token level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum At {
    /// Where a token may start (after indentation, `[`, `,`, `- `, `: `, …).
    #[default]
    Token,
    /// Inside a plain (unquoted) scalar, where quotes are text.
    Plain,
    /// Right after a complete node (a closing quote or bracket), where `:` may follow directly.
    Node,
}

/// An estimate of nesting depth, line by line, that errs high rather than low.
///
/// Block nesting comes from indentation and from `- `, `? ` and `: ` opening nodes on a line.
/// Flow nesting, what makes the parser slow, is counted twice: once following YAML's rules for
/// quotes, comments and block scalars, and once counting every bracket in the text, whatever
/// surrounds it. Neither is a parser; taking the larger means that deep nesting has to mislead
/// both to reach the parser. Brackets inside strings and comments do count in the second, so a
/// file whose strings and comments leave dozens of brackets unclosed is refused (no topology
/// has them). A one-pair mapping inside a flow sequence (`[a: b]`) has no bracket of its own and
/// is not counted.
#[derive(Debug, Default)]
struct Scan {
    /// Columns of the open block nodes, innermost last, and whether each is a sequence.
    block: Vec<(usize, bool)>,
    /// Open flow collections, by YAML's rules.
    flow: usize,
    /// The quote character of the scalar being read, across lines.
    quote: Option<u8>,
    at: At,
    /// In a block scalar (`|`, `>`): lines indented deeper than this column are its text.
    block_scalar: Option<usize>,
    /// Open brackets, counting every bracket in the text.
    brackets: usize,
}

fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

fn is_flow_indicator(b: u8) -> bool {
    matches!(b, b',' | b'[' | b']' | b'{' | b'}')
}

impl Scan {
    /// Reads one line (without its `\n`); returns the deepest nesting it reached.
    fn line(&mut self, line: &[u8]) -> usize {
        let brackets = self.brackets(line);
        let (block, flow) = self.structure(line);
        block + flow.max(brackets)
    }

    /// The count of every bracket: the deepest it reached on `line`.
    fn brackets(&mut self, line: &[u8]) -> usize {
        let mut deepest = self.brackets;
        for &b in line {
            match b {
                b'[' | b'{' => {
                    self.brackets += 1;
                    deepest = deepest.max(self.brackets);
                }
                b']' | b'}' => self.brackets = self.brackets.saturating_sub(1),
                _ => {}
            }
        }
        deepest
    }

    /// Block nesting after `line`, and the deepest flow nesting on it, by YAML's rules.
    fn structure(&mut self, line: &[u8]) -> (usize, usize) {
        let indent = line.iter().take_while(|b| **b == b' ').count();
        let blank = line[indent..].iter().all(|b| is_blank(*b));
        if let Some(parent) = self.block_scalar {
            if blank || indent > parent {
                return (self.block.len(), self.flow);
            }
            self.block_scalar = None;
        }
        if self.flow == 0 {
            // A misread quote would blind the scan to the rest of the file; in block context
            // a quoted scalar is taken to end with its line (no topology spans lines with one,
            // and misreading a real one only makes the estimate higher).
            self.quote = None;
            self.at = At::Token;
            if !blank && line[indent] != b'#' {
                self.block_line(line, indent);
            }
        }
        let flow = self.tokens(line, indent);
        (self.block.len(), flow)
    }

    /// Block structure: the line's indentation closes deeper nodes and opens one, and each
    /// `- `, `? ` or `: ` that starts the line's content opens one more. A sequence may sit at
    /// its mapping key's column (`key:` then `- item` below it): both count.
    fn block_line(&mut self, line: &[u8], indent: usize) {
        let entry = |i: usize| {
            matches!(line.get(i), Some(b'-' | b'?' | b':'))
                && line.get(i + 1).is_none_or(|b| is_blank(*b))
        };
        let sequence = line.get(indent) == Some(&b'-') && entry(indent);
        while let Some(&(column, open_sequence)) = self.block.last() {
            if column > indent || (column == indent && open_sequence && !sequence) {
                self.block.pop();
            } else {
                break;
            }
        }
        if self.block.last() != Some(&(indent, sequence)) {
            self.block.push((indent, sequence));
        }
        let mut i = indent;
        while entry(i) {
            i += 1;
            while line.get(i).is_some_and(|b| is_blank(*b)) {
                i += 1;
            }
            if line.get(i).is_none_or(|b| *b == b'#') {
                break;
            }
            self.block.push((i, line[i] == b'-' && entry(i)));
        }
    }

    /// Flow nesting by YAML's token rules; returns the deepest it reached on the line.
    fn tokens(&mut self, line: &[u8], indent: usize) -> usize {
        let mut deepest = self.flow;
        // The column of the node a block scalar on this line would belong to.
        let mut parent = indent;
        let mut i = indent;
        if indent == 0 && self.quote.is_none() && self.flow == 0 {
            if line.first() == Some(&b'%') {
                return deepest; // a directive
            }
            if (line.starts_with(b"---") || line.starts_with(b"..."))
                && line.get(3).is_none_or(|b| is_blank(*b))
            {
                i = 3;
            }
        }
        while let Some(&c) = line.get(i) {
            let next = line.get(i + 1).copied();
            if let Some(quote) = self.quote {
                if quote == b'"' && c == b'\\' {
                    i += 2;
                    continue;
                }
                if c == quote {
                    if quote == b'\'' && next == Some(b'\'') {
                        i += 2;
                        continue;
                    }
                    self.quote = None;
                    self.at = At::Node;
                }
                i += 1;
                continue;
            }
            if c == b'#' && (i == 0 || is_blank(line[i - 1])) {
                if self.at == At::Plain {
                    self.at = At::Token;
                }
                break;
            }
            if is_blank(c) {
                i += 1;
                continue;
            }
            let in_flow = self.flow > 0;
            let next_blank = next.is_none_or(is_blank);
            match (self.at, c) {
                // Brackets open and close wherever the parser could take them as such.
                (at, b'[' | b'{') if at == At::Token || in_flow => {
                    self.flow += 1;
                    deepest = deepest.max(self.flow);
                    self.at = At::Token;
                }
                (_, b']' | b'}') if in_flow => {
                    self.flow = self.flow.saturating_sub(1);
                    self.at = At::Node;
                }
                (_, b',') if in_flow => self.at = At::Token,
                (At::Token, b'-' | b'?') if next_blank => parent = i,
                (_, b':') if next_blank || (in_flow && self.at != At::Plain) => {
                    self.at = At::Token;
                }
                (At::Plain, b':') if in_flow && next.is_some_and(is_flow_indicator) => {
                    self.at = At::Token;
                }
                (At::Token, b'\'' | b'"') => {
                    parent = i;
                    self.quote = Some(c);
                }
                (At::Token, b'!' | b'&' | b'*') => {
                    // A tag, an anchor or an alias: a name up to a blank or a flow indicator.
                    let ends_name = |b: u8| is_blank(b) || (in_flow && is_flow_indicator(b));
                    while line.get(i + 1).is_some_and(|b| !ends_name(*b)) {
                        i += 1;
                    }
                    if c == b'*' {
                        self.at = At::Node;
                    }
                }
                (At::Token, b'|' | b'>') if !in_flow => {
                    self.block_scalar = Some(parent);
                    break;
                }
                (At::Token | At::Node, _) => {
                    parent = i;
                    self.at = At::Plain;
                }
                (At::Plain, _) => {}
            }
            i += 1;
        }
        deepest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block and flow nesting (by YAML's rules) after each line of `text`.
    fn structure(text: &str) -> Vec<(usize, usize)> {
        let mut scan = Scan::default();
        text.split('\n')
            .map(|line| scan.structure(line.as_bytes()))
            .collect()
    }

    #[test]
    fn block_nesting_follows_indentation_and_entries() {
        let text = "a:\n  b:\n    - c: 1\n      d:\n        - - e\n  f: [1]\ng: 2";
        let block: Vec<usize> = structure(text).iter().map(|d| d.0).collect();
        assert_eq!(block, [1, 2, 4, 4, 7, 2, 1]);
        // Sequences at their key's column.
        let text = "k:\n- a: 1\n  b:\n  - c\n- d\nj: 2";
        let block: Vec<usize> = structure(text).iter().map(|d| d.0).collect();
        assert_eq!(block, [1, 3, 3, 5, 3, 1]);
    }

    #[test]
    fn flow_nesting_skips_strings_comments_and_block_scalars() {
        for text in [
            "a: \"[[ {{ \\\" [[\"",
            "a: '[[ {{ '' [['",
            "a: b[[ {{ 'c [[",
            "a: 1 # [[ {{ \" ' [[",
            "a: |\n  [[ {{ \" '\n  [[\nb: >-\n    {{ [[",
            "- &x b[[ {{",
        ] {
            let flow: Vec<usize> = structure(text).iter().map(|d| d.1).collect();
            assert!(flow.iter().all(|f| *f == 0), "{text:?}: {flow:?}");
        }
    }

    #[test]
    fn flow_nesting_follows_collections_across_lines() {
        let text = "a: [b, {c: [d]},\n  \"e ]]\",\n  'f'': ]]', g,\n  [[ # ]]\n  ]]]";
        let flow: Vec<usize> = structure(text).iter().map(|d| d.1).collect();
        assert_eq!(flow, [3, 1, 1, 3, 3]);
    }

    #[test]
    fn a_quote_in_block_context_ends_with_its_line() {
        // Read as a quote, the continuation of `a` would hide the brackets below.
        let text = "k: a\n 'b\nj: [[[[";
        assert_eq!(structure(text)[2].1, 4);
    }
}
