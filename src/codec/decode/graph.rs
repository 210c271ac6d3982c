//! After the opcodes: the graph check (cycles, the cost of the tree it would expand into) and the
//! materialization of the checked graph into [`Value`]s.

use super::*;

impl<'a> Machine<'a, '_> {
    /// The `i`-th child of a node, in the order the built value holds them.
    pub(super) fn child(&self, id: Id, i: usize) -> Option<Id> {
        match self.nodes.get(id as usize)? {
            Node::List(v) | Node::Tuple(v) | Node::Set(v) | Node::FrozenSet(v) => v.get(i).copied(),
            Node::Dict(pairs) => pair_child(pairs, i),
            Node::Object(obj) => {
                if i == 0 {
                    return Some(obj.class);
                }
                let mut i = i - 1;
                let args: &[Id] = match self.nodes.get(obj.args as usize) {
                    Some(Node::Tuple(items)) => items,
                    _ => &[],
                };
                if let Some(&a) = args.get(i) {
                    return Some(a);
                }
                i -= args.len();
                if let Some(c) = pair_child(&obj.kwargs, i) {
                    return Some(c);
                }
                i -= obj.kwargs.len() * 2;
                if let Some(state) = obj.state {
                    if i == 0 {
                        return Some(state);
                    }
                    i -= 1;
                }
                if let Some(&c) = obj.list_items.get(i) {
                    return Some(c);
                }
                i -= obj.list_items.len();
                pair_child(&obj.dict_items, i)
            }
            _ => None,
        }
    }

    pub(super) fn is_container(&self, id: Id) -> bool {
        matches!(
            self.nodes.get(id as usize),
            Some(Node::List(_) | Node::Tuple(_) | Node::Dict(_) | Node::Set(_) | Node::FrozenSet(_) | Node::Object(_))
        )
    }

    /// What one copy of this node costs against `max_nodes`, without its children.
    pub(super) fn own_cost(&self, id: Id) -> u64 {
        let payload = match self.nodes.get(id as usize) {
            Some(Node::Str(t)) => t.len(),
            Some(Node::Bytes(b) | Node::ByteArray(b) | Node::BigInt(b)) => b.len(),
            Some(Node::Global(g)) => g.0.len() + g.1.len(),
            _ => 0,
        };
        1 + (payload / PAYLOAD_BYTES_PER_NODE) as u64
    }

    /// Reject cycles, excessive depth and excessive expansion before building anything. Iterative
    /// depth-first search; each reachable node is finished once, with its expanded size summed from
    /// its children (so shared sub-graphs are counted once per reference without being walked again).
    pub(super) fn check_graph(&self, root: Id) -> Result<(), CodecError> {
        let budget = self.limits.node_budget(self.data.len());
        let max_nodes = u64::try_from(budget).unwrap_or(u64::MAX);
        let n = self.nodes.len();
        let mut color = vec![WHITE; n];
        let mut cost = vec![0u64; n];
        let mut path: Vec<(Id, usize)> = Vec::new();

        self.enter(root, &mut color, &mut cost, &mut path)?;
        while let Some(&(id, i)) = path.last() {
            if let Some(child) = self.child(id, i) {
                if let Some(top) = path.last_mut() {
                    top.1 += 1;
                }
                match color.get(child as usize).copied().unwrap_or(BLACK) {
                    WHITE => self.enter(child, &mut color, &mut cost, &mut path)?,
                    GREY => return Err(CodecError::Recursive),
                    _ => {}
                }
            } else {
                path.pop();
                let mut total = self.own_cost(id);
                let mut j = 0;
                while let Some(child) = self.child(id, j) {
                    total = total.saturating_add(cost.get(child as usize).copied().unwrap_or(0));
                    j += 1;
                }
                if total > max_nodes {
                    return Err(CodecError::TooManyNodes(budget));
                }
                if let Some(c) = cost.get_mut(id as usize) {
                    *c = total;
                }
                if let Some(c) = color.get_mut(id as usize) {
                    *c = BLACK;
                }
            }
        }
        if cost.get(root as usize).copied().unwrap_or(0) > max_nodes {
            return Err(CodecError::TooManyNodes(budget));
        }
        Ok(())
    }

    /// Start visiting a node: containers go on the DFS path, leaves are finished at once.
    pub(super) fn enter(
        &self,
        id: Id,
        color: &mut [u8],
        cost: &mut [u64],
        path: &mut Vec<(Id, usize)>,
    ) -> Result<(), CodecError> {
        if self.is_container(id) {
            if let Some(c) = color.get_mut(id as usize) {
                *c = GREY;
            }
            path.push((id, 0));
            if path.len() > self.limits.max_depth {
                return Err(CodecError::TooDeep(self.limits.max_depth));
            }
        } else {
            if let Some(c) = color.get_mut(id as usize) {
                *c = BLACK;
            }
            if let Some(c) = cost.get_mut(id as usize) {
                *c = self.own_cost(id);
            }
        }
        Ok(())
    }

    pub(super) fn build_all(&self, ids: &[Id]) -> Result<Vec<Value>, CodecError> {
        ids.iter().map(|&id| self.build(id)).collect()
    }

    pub(super) fn build_pairs(&self, pairs: &[(Id, Id)]) -> Result<Vec<(Value, Value)>, CodecError> {
        pairs
            .iter()
            .map(|&(k, v)| Ok((self.build(k)?, self.build(v)?)))
            .collect()
    }

    /// Build the value tree. Only called after [`Self::check_graph`], so it terminates, its recursion
    /// is bounded by `max_depth` and its size by `max_nodes`.
    pub(super) fn build(&self, id: Id) -> Result<Value, CodecError> {
        Ok(match self.node(id)? {
            Node::None => Value::None,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::Int(*i),
            Node::BigInt(b) => Value::BigInt(b.to_vec()),
            Node::Float(f) => Value::Float(*f),
            Node::Str(t) => Value::Str(t.to_string()),
            Node::Bytes(b) => Value::Bytes(b.to_vec()),
            Node::ByteArray(b) => Value::ByteArray(b.to_vec()),
            Node::List(items) => Value::List(self.build_all(items)?),
            Node::Tuple(items) => Value::Tuple(self.build_all(items)?),
            Node::Set(items) => Value::Set(self.build_all(items)?),
            Node::FrozenSet(items) => Value::FrozenSet(self.build_all(items)?),
            Node::Dict(pairs) => Value::Dict(self.build_pairs(pairs)?),
            Node::Global(g) => Value::Global {
                module: g.0.to_string(),
                qualname: g.1.to_string(),
            },
            Node::Object(obj) => {
                let args = match self.node(obj.args)? {
                    Node::Tuple(items) => self.build_all(items)?,
                    _ => Vec::new(),
                };
                Value::Object(Box::new(Object {
                    class: self.build(obj.class)?,
                    kind: obj.kind,
                    args,
                    kwargs: self.build_pairs(&obj.kwargs)?,
                    state: obj.state.map(|s| self.build(s)).transpose()?,
                    list_items: self.build_all(&obj.list_items)?,
                    dict_items: self.build_pairs(&obj.dict_items)?,
                }))
            }
        })
    }
}

const WHITE: u8 = 0;
const GREY: u8 = 1;
const BLACK: u8 = 2;

/// The `i`-th id of a flattened list of pairs.
fn pair_child(pairs: &[(Id, Id)], i: usize) -> Option<Id> {
    let (k, v) = pairs.get(i / 2)?;
    Some(if i.is_multiple_of(2) { *k } else { *v })
}
